"""Which outputs a caption task instance may have produced, decided from what its DAG's tasks cannot write.

The gallery view (caption_gallery_plugin) finds the output of a task instance in the operator's extra-link
XCom. Any task of the same DAG can push that key, and so can anyone with XCom write access through the REST
API, so the XCom alone would let DAG B name DAG A's output and show A's captions to users who may read only
B. The view therefore also asks this module for the output *prefixes* the producing task allows, and serves a
recorded output only under one of them. The prefixes come from, in order:

1. the API server's own configuration, ``[caption_gallery] output_prefixes`` (environment
   ``AIRFLOW__CAPTION_GALLERY__OUTPUT_PREFIXES``): JSON mapping a DAG id to a list of ``s3://bucket/prefix``
   strings. A DAG listed there gets exactly those (an override); unparsable JSON refuses every DAG.
2. otherwise the task as the dag processor serialized it (the version the task instance ran with, from the
   deployment's DAG file): its ``output_uri`` template, or, without one, its ``meta_path`` template up to the
   last ``/`` (the default output lives beside its input). ``{{ params.NAME }}`` is replaced by the run's
   param (the DAG's default, or the run's conf, which only whoever triggered the run chose); the prefix ends
   at the first other template construct. No Jinja is run: nothing here evaluates DAG-author code.

A prefix that does not name at least a bucket (``s3://bucket/``) binds nothing, and a task with no binding
is refused: a DAG whose caption outputs are named only at run time by its own tasks (video_curation's shards
come from its filter task) needs an ``output_prefixes`` entry for its galleries to be served.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

SECTION, OPTION = "caption_gallery", "output_prefixes"
_PARAM = re.compile(r"\{\{\s*params\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_TEMPLATE = re.compile(r"\{[{%#]")
_BUCKET = re.compile(r"s3://[^/]+/")


def template_prefix(template: str, params: Mapping[str, Any]) -> str:
    """The literal start of ``template``'s rendering: text and ``{{ params.NAME }}`` values (strings only)
    up to the first other template construct."""
    out, pos = [], 0
    while (start := _TEMPLATE.search(template, pos)) is not None:
        out.append(template[pos:start.start()])
        param = _PARAM.match(template, start.start())
        value = params.get(param.group(1)) if param else None
        if not isinstance(value, str):
            return "".join(out)
        out.append(value)
        pos = param.end()
    return "".join(out) + template[pos:]


def derived_prefixes(fields: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[str, ...]:
    """The output prefix a caption task's serialized ``fields`` (``output_uri``, ``meta_path``) allow."""
    output, meta = fields.get("output_uri"), fields.get("meta_path")
    if isinstance(output, str) and output:
        prefix = template_prefix(output, params)
    elif not output and isinstance(meta, str):
        prefix = template_prefix(meta, params)
        prefix = prefix[:prefix.rfind("/") + 1]
    else:
        return ()
    return (prefix,) if _BUCKET.match(prefix) else ()


def task_fields(task) -> dict[str, Any]:
    """The location fields (``output_uri``, ``meta_path``) of a serialized task as parsed. A mapped task's
    count only where no map input can set them (``expand_kwargs`` of an upstream XCom could set either)."""
    if not getattr(task, "is_mapped", False):
        return {"output_uri": getattr(task, "output_uri", None), "meta_path": getattr(task, "meta_path", None)}
    partial = dict(getattr(task, "partial_kwargs", None) or {})
    if partial.get("output_uri"):
        return {"output_uri": partial["output_uri"]}
    mapped = getattr(getattr(task, "expand_input", None), "value", None)
    if not isinstance(mapped, Mapping) or "output_uri" in mapped or "meta_path" not in partial:
        return {}
    return {"output_uri": None, "meta_path": partial["meta_path"]}


def configured_prefixes(raw: str | None) -> dict[str, tuple[str, ...]] | None:
    """``output_prefixes`` parsed: dag id -> prefixes naming a bucket; None if it is not such JSON."""
    if not raw or not raw.strip():
        return {}
    try:
        value = json.loads(raw)
        if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
            raise ValueError("not an object of lists")
    except ValueError as err:
        log.error("[%s] %s is not a JSON object of lists (%s): no gallery is served", SECTION, OPTION, err)
        return None
    return {dag: tuple(p for p in prefixes if isinstance(p, str) and _BUCKET.match(p))
            for dag, prefixes in value.items()}


def within(uri: str, prefixes: Sequence[str]) -> bool:
    """``uri`` starts with one of ``prefixes`` and has no empty, ``.`` or ``..`` key segment (which an S3
    server may normalise away, leaving the prefix)."""
    key = uri.split("://", 1)[-1].split("/", 1)[-1]
    if not key or any(seg in ("", ".", "..") for seg in key.split("/")):
        return False
    return any(uri.startswith(p) for p in prefixes)


def allowed_prefixes(dag_id: str, run_id: str, task_id: str, map_index: int) -> tuple[str, ...]:
    """The prefixes the producing task instance allows: the configured override, else derived from the
    serialized task it ran with and its run's params; () when nothing binds it."""
    from airflow.configuration import conf

    configured = configured_prefixes(conf.get(SECTION, OPTION, fallback=""))
    if configured is None:
        return ()
    if dag_id in configured:
        return configured[dag_id]
    found = _ti_version_and_conf(dag_id, run_id, task_id, map_index)
    serialized = _serialized_task(found[0], task_id) if found else None
    if serialized is None:
        return ()
    fields, params = serialized
    overrides = found[1] if conf.getboolean("core", "dag_run_conf_overrides_params", fallback=True) else None
    return derived_prefixes(fields, dict(params.deep_merge(overrides or {}).dump()))


def _ti_version_and_conf(dag_id: str, run_id: str, task_id: str, map_index: int):
    """(DAG version id the task instance ran with, its run's conf), or None."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        version = session.scalar(select(TaskInstance.dag_version_id).where(
            TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id,
            TaskInstance.map_index == map_index))
        run_conf = session.scalar(select(DagRun.conf).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    return (version, run_conf if isinstance(run_conf, dict) else {}) if version is not None else None


@functools.lru_cache(maxsize=64)
def _serialized_task(version_id, task_id: str):
    """(location fields, DAG params) of ``task_id`` in one serialized DAG version (immutable once written,
    so cached: a gallery page loads up to a hundred thumbnails), or None."""
    from airflow.models.dag_version import DagVersion
    from airflow.utils.session import create_session

    with create_session() as session:
        version = session.get(DagVersion, version_id)
        if version is None or version.serialized_dag is None:
            return None
        dag = version.serialized_dag.dag
    task = dag.task_dict.get(task_id)
    return (task_fields(task), dag.params) if task is not None else None
