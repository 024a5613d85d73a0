"""AscendCaptionOperator: caption one meta partition with msrun; thin, the work is in MsrunHook.

Idempotent by construction: with ``skip_if_existing`` (default) a finished partition returns its counts
without launching anything; a retry resumes from the row journal; an S3 lease keeps two attempts at the
same partition from running at once.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import AssetAlias, BaseOperator, BaseOperatorLink, Context

from operators.lease import S3Lease
from operators.msrun_hook import MsrunHook, MsrunSpec, pick_free_port, port_for

CAPTION_SCRIPTS = {"qwen2vl": "caption_qwen2vl.py", "pllava": "caption_pllava.py"}
CAPTIONS_ALIAS = "caption-outputs"
DEFAULT_ENV = {"HCCL_CONNECT_TIMEOUT": "7200"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def caption_argv(options: dict[str, Any]) -> list[str]:
    """Seed-style CLI arguments from a dict: ``{"bs": 2, "skip_if_existing": True}`` -> ``--bs 2 --skip...``."""
    argv: list[str] = []
    for key, value in options.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise ValueError(f"bad caption option name {key!r}")
        if isinstance(value, bool):
            if value:
                argv.append(f"--{key}")
        elif isinstance(value, list | tuple):
            for item in value:
                argv += [f"--{key}", str(item)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def gallery_url(conn_id: str, uri: str, suffix: str = "") -> str:
    """Path of an S3 object under the API server's ``/caption-gallery`` view (caption_gallery_plugin)."""
    from urllib.parse import quote, urlsplit

    from airflow.configuration import conf

    bucket, key = split_s3(uri)
    root = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    return f"{root}/caption-gallery/{quote(conn_id)}/{quote(bucket)}/{quote(key + suffix)}"


class _OutputObjectLink(BaseOperatorLink):
    """A link to an object beside the task's output (empty until the task has an s3:// output)."""

    suffix = ""

    def get_link(self, operator: BaseOperator, *, ti_key) -> str:
        uri = getattr(operator, "output_uri", None)
        if not uri or not str(uri).startswith("s3://"):
            return ""
        return gallery_url(operator.aws_conn_id or "caption_s3", uri, self.suffix)


class CaptionGalleryLink(_OutputObjectLink):
    """The partition's caption gallery (thumbnails, captions, failures, summary)."""

    name = "Caption gallery"
    suffix = ".gallery/index.html"


class CaptionOutputLink(_OutputObjectLink):
    """The partition's output CSV."""

    name = "Caption output"


class AscendCaptionOperator(BaseOperator):
    """Caption every video of one meta partition with Qwen2-VL or PLLaVA under msrun.

    :param meta_path: the partition's meta CSV, ``s3://bucket/key.csv`` (templated)
    :param model: ``qwen2vl`` or ``pllava`` (templated)
    :param model_dir: local checkpoint directory on the worker host (templated)
    :param output_uri: output CSV URI; default ``{stem}_caption_{model}{ext}`` beside the input (templated)
    :param caption_options: the caption script's arguments by their seed names, e.g.
        ``{"question": ..., "max_new_tokens": 200, "bs": 1, "fps": 4, "device_target": "Ascend"}`` (templated)
    :param skip_if_existing: return at once, launching nothing, if the output exists (default True)
    :param worker_num: msrun ``--worker_num``, all ranks over all nodes (templated)
    :param local_worker_num: msrun ``--local_worker_num``, ranks on this host (templated)
    :param msrun_options: ``master_addr``, ``master_port`` (default: derived from the task identity, then
        the next free port), ``node_rank``, ``cluster_time_out``, ``join`` (templated)
    :param log_dir: msrun ``--log_dir`` (templated; default under ``$CAPTION_MSRUN_LOG_ROOT`` per try)
    :param aws_conn_id: Airflow ``aws`` connection whose key, secret and ``endpoint_url`` the ranks get
        through their environment
    :param env: extra environment for the ranks (templated); ``HCCL_CONNECT_TIMEOUT=7200`` by default
    :param lease_ttl: seconds a partition lease lives without renewal
    :param lease_wait: seconds to wait for another attempt's lease before failing
    :param kill_grace: seconds between SIGTERM and SIGKILL when the task is killed
    """

    template_fields: Sequence[str] = ("meta_path", "model", "model_dir", "output_uri", "caption_options",
                                      "worker_num", "local_worker_num", "msrun_options", "log_dir", "env")
    template_fields_renderers = {"caption_options": "json", "msrun_options": "json", "env": "json"}
    ui_color = "#e8f1d4"
    operator_extra_links = (CaptionGalleryLink(), CaptionOutputLink())

    def __init__(self, *, meta_path: str, model: str = "qwen2vl", model_dir: str, output_uri: str | None = None,
                 caption_options: dict[str, Any] | None = None, skip_if_existing: bool = True,
                 worker_num: int = 2, local_worker_num: int = 2, msrun_options: dict[str, Any] | None = None,
                 log_dir: str | None = None, aws_conn_id: str | None = "aws_default",
                 env: dict[str, str] | None = None, lease_ttl: float = 300.0, lease_wait: float = 600.0,
                 kill_grace: float = 10.0, **kwargs) -> None:
        kwargs.setdefault("outlets", [AssetAlias(CAPTIONS_ALIAS)])
        super().__init__(**kwargs)
        self.meta_path = meta_path
        self.model = model
        self.model_dir = model_dir
        self.output_uri = output_uri
        # Kept as given: under mapping these may still be unrendered template strings here.
        self.caption_options = caption_options if caption_options is not None else {}
        self.skip_if_existing = skip_if_existing
        self.worker_num = worker_num
        self.local_worker_num = local_worker_num
        self.msrun_options = msrun_options if msrun_options is not None else {}
        self.log_dir = log_dir
        self.aws_conn_id = aws_conn_id
        self.env = env if env is not None else {}
        self.lease_ttl = lease_ttl
        self.lease_wait = lease_wait
        self.kill_grace = kill_grace
        self._hook: MsrunHook | None = None

    # -- helpers ----------------------------------------------------------------------------------------
    def _s3(self):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.aws_conn_id).get_conn()

    def _rank_env(self) -> dict[str, str]:
        """S3 settings for the ranks, from the Airflow connection (masked in logs), never on argv."""
        env = {**DEFAULT_ENV, **{k: str(v) for k, v in self.env.items()}}
        if self.aws_conn_id:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            hook = S3Hook(aws_conn_id=self.aws_conn_id)
            creds = hook.get_credentials()
            env["AWS_ACCESS_KEY_ID"] = creds.access_key
            env["AWS_SECRET_ACCESS_KEY"] = creds.secret_key
            if creds.token:
                env["AWS_SESSION_TOKEN"] = creds.token
            if hook.conn_config.endpoint_url:
                env["AWS_ENDPOINT_URL"] = hook.conn_config.endpoint_url
            env["AWS_DEFAULT_REGION"] = hook.conn_config.region_name or "us-east-1"
        return env

    def _exists(self, client, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as err:
            if str(getattr(err, "response", {}).get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def _read_json(self, client, uri: str) -> dict:
        bucket, key = split_s3(uri)
        return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def _check_meta(self, client) -> None:
        """A partition without a ``path`` column fails here, before msrun starts."""
        from airflow.sdk.exceptions import AirflowFailException

        bucket, key = split_s3(self.meta_path)
        try:
            head = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-65535")["Body"].read()
        except Exception as err:
            raise AirflowFailException(f"cannot read meta partition {self.meta_path}: {err}") from err
        import csv
        import io

        header = next(csv.reader(io.StringIO(head.decode("utf-8", errors="replace"))), [])
        if "path" not in header:
            raise AirflowFailException(f"{self.meta_path}: no 'path' column (header: {header})")

    def _check_model_dir(self) -> None:
        """A missing or incomplete checkpoint on this host fails here, naming what is missing, before msrun."""
        from airflow.sdk.exceptions import AirflowFailException

        from captioning_core.models import captioner_class
        from captioning_core.models.base import ModelDirError, check_model_dir

        try:
            check_model_dir(self.model_dir, captioner_class(self.model).required_files)
        except ModelDirError as err:
            raise AirflowFailException(str(err)) from err

    def _default_log_dir(self, context: Context) -> str:
        ti = context["ti"]
        root = os.environ.get("CAPTION_MSRUN_LOG_ROOT") or os.path.join(tempfile.gettempdir(), "caption-msrun")
        parts = [ti.dag_id, ti.run_id, ti.task_id, f"map{ti.map_index}", f"try{ti.try_number}"]
        return os.path.join(root, *[_UNSAFE.sub("_", str(p)) for p in parts])

    def _spec(self, context: Context, script_args: list[str]) -> MsrunSpec:
        ti = context["ti"]
        opts = dict(self.msrun_options)
        port = opts.pop("master_port", None)
        if port in (None, "", 0):
            port = pick_free_port(port_for(f"{ti.dag_id}/{ti.run_id}/{ti.task_id}/{ti.map_index}"))
        import captioning_core

        script = str(Path(captioning_core.__file__).with_name(CAPTION_SCRIPTS[self.model]))
        return MsrunSpec(script=script, script_args=script_args, log_dir=self.log_dir or self._default_log_dir(context),
                         worker_num=int(self.worker_num), local_worker_num=int(self.local_worker_num),
                         master_port=int(port), **opts)

    def _script_args(self) -> list[str]:
        from airflow.sdk.exceptions import AirflowFailException

        args = [self.meta_path, "--pretrained_model_name_or_path", self.model_dir, "--output", self.output_uri,
                *caption_argv({k: v for k, v in self.caption_options.items() if k != "skip_if_existing"})]
        if self.skip_if_existing:
            args.append("--skip_if_existing")
        from captioning_core.cli import build_parser  # argparse only: no model code is imported

        try:
            build_parser(self.model).parse_args(args)
        except SystemExit as err:
            raise AirflowFailException(f"invalid caption options {self.caption_options}") from err
        return args

    # -- execute ----------------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk import Asset
        from airflow.sdk.exceptions import AirflowFailException

        from captioning_core.config import default_output

        if self.model not in CAPTION_SCRIPTS:
            raise AirflowFailException(f"model must be one of {sorted(CAPTION_SCRIPTS)}, got {self.model!r}")
        for name in ("caption_options", "msrun_options", "env"):
            if not isinstance(getattr(self, name), dict):
                raise AirflowFailException(f"{name} must render to a dict (use render_template_as_native_obj "
                                           f"for a templated dict), got {getattr(self, name)!r:.200}")
        self.output_uri = self.output_uri or default_output(self.meta_path, self.model)
        client = self._s3()
        summary_uri = f"{self.output_uri}.summary.json"
        started = time.time()
        launched = False
        if not (self.skip_if_existing and self._exists(client, self.output_uri)):
            self._check_meta(client)
            self._check_model_dir()
            script_args = self._script_args()
            bucket, key = split_s3(self.output_uri)
            ti = context["ti"]
            lease = S3Lease(client, bucket, f"{key}.lease", holder=f"{ti.dag_id}/{ti.run_id}/{ti.task_id}"
                            f"/{ti.map_index}/try{ti.try_number}", ttl=self.lease_ttl)
            lease.acquire(wait=self.lease_wait)
            try:
                if self.skip_if_existing and self._exists(client, self.output_uri):
                    self.log.info("another attempt finished %s while we waited", self.output_uri)
                else:
                    self._hook = MsrunHook(self._spec(context, script_args), self._rank_env(),
                                           kill_grace=self.kill_grace)
                    launched = True
                    self._hook.run()
            finally:
                lease.release()
        else:
            self.log.info("output exists, nothing to launch: %s", self.output_uri)
        result = self._result(client, summary_uri, started, launched)
        context["outlet_events"][AssetAlias(CAPTIONS_ALIAS)].add(Asset(self.output_uri), extra=result)
        return result

    def _summary(self, client, summary_uri: str) -> dict:
        """The summary the ranks wrote; for an output made elsewhere (no summary), counts from the CSV."""
        try:
            return self._read_json(client, summary_uri)
        except Exception as err:
            if str(getattr(err, "response", {}).get("Error", {}).get("Code")) not in ("NoSuchKey", "404"):
                raise
        import csv
        import io

        bucket, key = split_s3(self.output_uri)
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
        rows = list(csv.DictReader(io.StringIO(body)))
        ok = [r for r in rows if r.get("caption_status", "ok" if r.get("text") else "failed") == "ok"]
        return {"rows": len(rows), "captioned": len(ok), "failed": len(rows) - len(ok),
                "empty": sum(1 for r in ok if not (r.get("text") or "").strip())}

    def _result(self, client, summary_uri: str, started: float, launched: bool) -> dict[str, Any]:
        summary = self._summary(client, summary_uri)
        this_try = [s for s in summary.get("ranks", []) if launched and s.get("started_at", 0) >= started]
        skipped = sum(s.get("rows_skipped", 0) for s in this_try) if launched else summary["rows"]
        wall = sum(s.get("wall_seconds", 0.0) for s in this_try)
        busy = sum(s.get("busy_seconds", 0.0) for s in this_try)
        decoded = sum(s.get("rows_processed", 0) for s in this_try)
        return {"output": self.output_uri, "rows": summary["rows"], "captioned": summary["captioned"],
                "failed": summary["failed"], "empty": summary.get("empty", 0), "skipped": skipped,
                "launched": launched, "model_busy": round(busy / wall, 4) if wall else None,
                "rows_per_second": round(sum(s.get("rows_per_second", 0.0) for s in this_try), 4),
                "decode_seconds_per_row": round(sum(s.get("decode_seconds", 0.0) for s in this_try) / decoded, 4)
                if decoded else None,
                "input_wait_seconds": round(sum(s.get("input_wait_seconds", 0.0) for s in this_try), 3)}

    def on_kill(self) -> None:
        if self._hook is not None:
            self._hook.kill()
