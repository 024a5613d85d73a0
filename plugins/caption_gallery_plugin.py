"""Serves caption galleries and outputs from S3 inside the Airflow API server, behind Airflow's own login.

``GET /caption-gallery/{dag_id}/{run_id}/{task_id}/{map_index}/{conn_id}/{bucket}/{key}`` streams one object
through the named Airflow ``aws`` connection, so the operator's extra links work with whatever S3 endpoint is
in use, with no presigned URL to expire and relative links inside a gallery resolving naturally.

Who may read what. Airflow does not authenticate plugin apps, so this one does it itself, with the API
server's own pieces: ``get_user`` (the UI's session cookie or an ``Authorization: Bearer`` token; none -> 401)
and the configured auth manager's ``is_authorized_dag`` (GET on the DAG's task instances; refused -> 403).
The DAG is not guessed from the bucket or key, and not fixed to one configured DAG: the URL names the task
instance that produced the object, and the object must be one that task instance recorded. The record is
the operator's own extra-link XCom (``_link_CaptionOutputLink``, written by Airflow when the task ends),
which holds the output's connection, bucket and key; only that output, its summary and the files of its
gallery folder (``captioning_core.layout``) are served (else 404). The XCom is not proof on its own: the
DAG's own tasks and the XCom REST API can write it, naming another DAG's output. So the recorded output must
also lie under a prefix the producing task allows, derived from what those cannot write: the API server's
``[caption_gallery] output_prefixes`` or the task as the dag processor serialized it (caption_gallery_scope;
else 404). So a user sees exactly the galleries of DAGs whose task instances they may read, the same rule as
the task's own log and XCom in the UI, and neither a URL naming another DAG's run nor a link planted in
another DAG's XCom reaches this DAG's objects. Connections are also limited to ``$CAPTION_GALLERY_CONN_IDS``
(default ``caption_s3``).

What is served is data, never code on Airflow's origin: anyone who can write to the bucket could plant
HTML. Every response carries ``Content-Security-Policy: sandbox allow-same-origin`` plus ``default-src
'none'; img-src 'self'; style-src 'unsafe-inline'`` and ``X-Content-Type-Options: nosniff``: no script runs
(the sandbox has no ``allow-scripts``, and no script source is allowed), no form submits, no plugin loads, and
only the gallery's own images and inline style load. ``allow-same-origin`` is there because without it the
page gets an opaque origin and the browser withholds the user's ``SameSite=Lax`` session cookie from the
page's own thumbnail requests (they then fail as 401s); with no script able to run, keeping the origin gives
a planted page nothing to use it with.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Annotated
from urllib.parse import unquote, urlsplit

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from captioning_core.layout import PartitionLayout, looks_like_gallery_object

PREFIX = "/caption-gallery"
LINK_KEY = "_link_CaptionOutputLink"  # CaptionOutputLink's XCom key (operators.ascend_caption)
SECURITY_HEADERS = {
    "Content-Security-Policy": "sandbox allow-same-origin; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "private, no-store",
}

STREAM_CHUNK = 1 << 16  # bytes per chunk the view relays from S3

app = FastAPI(title="Caption gallery", docs_url=None, redoc_url=None, openapi_url=None)


@app.middleware("http")
async def _security_headers(request: Request, call_next):
    response = await call_next(request)  # errors (401/403/404) included
    response.headers.update(SECURITY_HEADERS)
    return response


def allowed_key(key: str, output_key: str | None = None) -> bool:
    """Gallery pages/thumbnails, the caption output and its summary; nothing else, no traversal.

    With ``output_key`` (the output the task instance recorded, whatever its name), exactly that partition's
    objects (``PartitionLayout.serves``); without it, only keys shaped like a default-named output's.
    """
    if output_key is not None:
        return PartitionLayout(output_key).serves(key)
    return looks_like_gallery_object(key)


def belongs_to_output(key: str, output_key: str) -> bool:
    """``key`` is the output itself, its summary, or a gallery file beside it."""
    return PartitionLayout(output_key).serves(key)


def parse_link(url: str) -> tuple[str, str, str] | None:
    """(conn_id, bucket, key) of the output named by an extra-link URL, or None."""
    path = urlsplit(url or "").path
    if f"{PREFIX}/" not in path:
        return None
    parts = path.split(f"{PREFIX}/", 1)[1].split("/")
    if len(parts) < 7:
        return None
    return unquote(parts[4]), unquote(parts[5]), unquote("/".join(parts[6:]))


def _recorded_output(dag_id: str, run_id: str, task_id: str, map_index: int) -> tuple[str, str, str] | None:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.execute(select(XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
            XComModel.map_index == map_index, XComModel.key == LINK_KEY)).first()
    if row is None:
        return None
    url = XComModel.deserialize_value(row)
    return parse_link(url if isinstance(url, str) else "")


def _bound(recorded: tuple[str, str, str], dag_id: str, run_id: str, task_id: str, map_index: int) -> bool:
    """The recorded output lies under a prefix the producing task allows (caption_gallery_scope): the XCom
    alone can be written by the DAG's own tasks and by the XCom REST API."""
    from caption_gallery_scope import allowed_prefixes, within

    return within(f"s3://{recorded[1]}/{recorded[2]}", allowed_prefixes(dag_id, run_id, task_id, map_index))


async def current_user(request: Request):
    """The API server's own ``get_user``: a Bearer token, else the UI's session cookie; none -> 401.

    Imported here, not at module level: every Airflow component loads plugins, only the API server serves.
    ``get_user`` resolves the auth manager through ``get_auth_manager()`` (the process-wide instance the
    API server initialised), not through ``request.app.state``, so it works the same in this mounted
    sub-app as in Airflow's own routes.
    """
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


UserDep = Annotated[object, Depends(current_user)]


def _authorize(user, dag_id: str) -> None:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    allowed = get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.TASK_INSTANCE,
        details=DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id)), user=user)
    if not allowed:
        raise HTTPException(status_code=403, detail="no read access to this DAG's task instances")


def _client(conn_id: str):
    import boto3
    from airflow.models.connection import Connection
    from botocore.config import Config

    conn = Connection.get_connection_from_secrets(conn_id)
    extra = conn.extra_dejson
    return boto3.client("s3", aws_access_key_id=conn.login, aws_secret_access_key=conn.password,
                        endpoint_url=extra.get("endpoint_url"), region_name=extra.get("region_name", "us-east-1"),
                        config=Config(s3={"addressing_style": "path"} if extra.get("endpoint_url") else {}))


@app.get("/{dag_id}/{run_id}/{task_id}/{map_index}/{conn_id}/{bucket}/{key:path}")
def serve(dag_id: str, run_id: str, task_id: str, map_index: int, conn_id: str, bucket: str, key: str,
          user: UserDep) -> Response:
    from captioning_core import storage

    _authorize(user, dag_id)
    allowed = {c.strip() for c in os.environ.get("CAPTION_GALLERY_CONN_IDS", "caption_s3").split(",") if c.strip()}
    recorded = _recorded_output(dag_id, run_id, task_id, map_index)
    if (conn_id not in allowed or recorded is None or recorded[:2] != (conn_id, bucket)
            or not allowed_key(key, recorded[2]) or not _bound(recorded, dag_id, run_id, task_id, map_index)):
        raise HTTPException(status_code=404, detail="not a caption gallery object of this task instance")
    try:
        obj = _client(conn_id).get_object(Bucket=bucket, Key=key)
    except Exception as err:
        if storage.is_not_found(err):
            raise HTTPException(status_code=404, detail="no such object") from err
        raise HTTPException(status_code=502, detail=storage.error_code(err) or "S3 error") from err
    media = mimetypes.guess_type(key)[0] or ("application/json" if key.endswith(".json") else "text/csv")
    if key.endswith(".csv"):
        media = "text/csv; charset=utf-8"
    elif key.endswith(".html"):
        media = "text/html; charset=utf-8"
    # streamed in chunks: a large output or page never sits whole in the API server's memory
    body = obj["Body"]
    return StreamingResponse(body.iter_chunks(STREAM_CHUNK), media_type=media,
                             headers={"Content-Length": str(obj["ContentLength"])}, background=BackgroundTask(body.close))


class CaptionGalleryPlugin(AirflowPlugin):
    name = "caption_gallery"
    fastapi_apps = [{"app": app, "url_prefix": PREFIX, "name": "Caption gallery"}]
