"""Serves caption galleries and outputs from S3 inside the Airflow API server, at ``/caption-gallery/``.

``GET /caption-gallery/{conn_id}/{bucket}/{key}`` streams an object through the named Airflow ``aws``
connection, so the operator's extra links work with whatever S3 endpoint is in use, with no presigned URL to
expire and relative links inside a gallery resolving naturally. Only gallery files, caption outputs and
their summaries can be read, and only through connections listed in ``$CAPTION_GALLERY_CONN_IDS``
(default ``caption_s3``).
"""

from __future__ import annotations

import mimetypes
import os

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

app = FastAPI(title="Caption gallery", docs_url=None, redoc_url=None, openapi_url=None)


def allowed_key(key: str) -> bool:
    """Gallery pages/thumbnails, caption outputs and their summaries; nothing else, no traversal."""
    if ".." in key.split("/") or key.startswith("/"):
        return False
    name = key.rsplit("/", 1)[-1]
    if ".gallery/" in key:
        return name.endswith((".html", ".jpg"))
    return "_caption_" in name and name.endswith((".csv", ".csv.summary.json"))


def _client(conn_id: str):
    import boto3
    from airflow.models.connection import Connection
    from botocore.config import Config

    conn = Connection.get_connection_from_secrets(conn_id)
    extra = conn.extra_dejson
    return boto3.client("s3", aws_access_key_id=conn.login, aws_secret_access_key=conn.password,
                        endpoint_url=extra.get("endpoint_url"), region_name=extra.get("region_name", "us-east-1"),
                        config=Config(s3={"addressing_style": "path"} if extra.get("endpoint_url") else {}))


@app.get("/{conn_id}/{bucket}/{key:path}")
def serve(conn_id: str, bucket: str, key: str) -> Response:
    allowed = {c.strip() for c in os.environ.get("CAPTION_GALLERY_CONN_IDS", "caption_s3").split(",") if c.strip()}
    if conn_id not in allowed or not allowed_key(key):
        raise HTTPException(status_code=404, detail="not a caption gallery object")
    try:
        obj = _client(conn_id).get_object(Bucket=bucket, Key=key)
    except Exception as err:
        code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
        raise HTTPException(status_code=404 if code in ("NoSuchKey", "404", "NoSuchBucket") else 502,
                            detail=code or "S3 error") from err
    media = mimetypes.guess_type(key)[0] or ("application/json" if key.endswith(".json") else "text/csv")
    if key.endswith(".csv"):
        media = "text/csv; charset=utf-8"
    return Response(content=obj["Body"].read(), media_type=media)


class CaptionGalleryPlugin(AirflowPlugin):
    name = "caption_gallery"
    fastapi_apps = [{"app": app, "url_prefix": "/caption-gallery", "name": "Caption gallery"}]
