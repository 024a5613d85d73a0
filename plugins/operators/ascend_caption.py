"""AscendCaptionOperator: caption one meta partition with msrun; thin, the work is in MsrunHook.

Idempotent by construction: with ``skip_if_existing`` (default) a finished partition returns its counts
without launching anything; a retry resumes from the row journal; a fenced S3 lease keeps two attempts at
the same partition from running at once (operators.lease), and an attempt that loses it stops msrun.

Trust boundaries: the operator owns the rank's argv (``caption_options`` may not override the meta path,
output, model dir, skip flag or allowed roots, and every value is passed as ``--key=value``, so a leading dash
is data), what the ranks may read (``--allowed_root``: the operator's ``allowed_roots``, by default the meta
CSV's bucket, so a row naming ``/etc/passwd`` or another bucket fails as that row's failure, unread),
the ranks' environment (an allow-list, operators.msrun_hook.rank_environment: no ``AIRFLOW__*`` setting,
Fernet key or database URI reaches a rank; the DAG's ``env`` is limited to tuning variables by
operators.rank_env, so it cannot open a gate below), fault injection (only with
``allow_fault_injection=True``), and what weights may be loaded (safetensors unless
``allow_pickled_weights=True``).
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

from captioning_core.arguments import owned_options
from captioning_core.layout import PartitionLayout
from operators import rank_env
from operators.lease import LeaseHeldError, S3Lease
from operators.lineage import CaptionLineageMixin
from operators.msrun_hook import MsrunHook, MsrunSpec, pick_free_port, port_for

#: the seed-named entry scripts; every other registered captioner runs as ``caption.py MODEL ...``
CAPTION_SCRIPTS = {"qwen2vl": "caption_qwen2vl.py", "pllava": "caption_pllava.py"}
CAPTIONS_ALIAS = "caption-outputs"
DEFAULT_ENV = {"HCCL_CONNECT_TIMEOUT": "7200"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")
#: the operator's own arguments for what it owns, and its weights switch: refused in caption_options as well,
#: so that a misplaced one fails instead of being ignored
OPERATOR_ARGUMENTS = frozenset({"output_uri", "model_dir", "allow_pickled_weights"})
#: caption script options the operator sets itself (declared ``owned`` in RunConfig's option specs) and its own
#: arguments for them; caption_options may not set any of these
OWNED_OPTIONS = owned_options() | OPERATOR_ARGUMENTS


def caption_entry(model: str) -> tuple[str, list[str]]:
    """The msrun entry script for ``model`` and the arguments that go before the meta path."""
    import captioning_core

    if model in CAPTION_SCRIPTS:
        return str(Path(captioning_core.__file__).with_name(CAPTION_SCRIPTS[model])), []
    return str(Path(captioning_core.__file__).with_name("caption.py")), [model]


def split_s3(uri: str) -> tuple[str, str]:
    from captioning_core.storage import split

    return split(uri)


def caption_argv(options: dict[str, Any]) -> list[str]:
    """Seed-style CLI arguments from a dict, one ``--key=value`` item each (so a value starting with ``-`` is
    data, never an option): ``{"bs": 2, "use_lora": True}`` -> ``["--bs=2", "--use_lora"]``."""
    argv: list[str] = []
    for key, value in options.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
            raise ValueError(f"bad caption option name {key!r}")
        if isinstance(value, bool):
            if value:
                argv.append(f"--{key}")
        elif isinstance(value, list | tuple):
            argv += [f"--{key}={item}" for item in value]
        elif value is not None:
            argv.append(f"--{key}={value}")
    return argv


def gallery_url(conn_id: str, uri: str, suffix: str = "", ti_key=None) -> str:
    """Path of an S3 object under the API server's ``/caption-gallery`` view (caption_gallery_plugin).

    The path names the task instance that produced the object (dag, run, task, map index): the view lets
    in only users who may read that DAG's task instances, and only for objects that task recorded.
    """
    from urllib.parse import quote, urlsplit

    from airflow.configuration import conf

    bucket, key = split_s3(uri)
    root = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    ti = [ti_key.dag_id, ti_key.run_id, ti_key.task_id, str(ti_key.map_index)] if ti_key is not None else []
    parts = [*ti, conn_id, bucket]
    return f"{root}/caption-gallery/" + "/".join(quote(p, safe="") for p in parts) + "/" + quote(key + suffix)


class _OutputObjectLink(BaseOperatorLink):
    """A link to an object beside the task's output (empty until the task has an s3:// output)."""

    suffix = ""

    def get_link(self, operator: BaseOperator, *, ti_key) -> str:
        uri = getattr(operator, "output_uri", None)
        if not uri or not str(uri).startswith("s3://") or ti_key is None:
            return ""
        return gallery_url(operator.aws_conn_id or "caption_s3", uri, self.suffix, ti_key)


class CaptionGalleryLink(_OutputObjectLink):
    """The partition's caption gallery (thumbnails, captions, failures, summary)."""

    name = "Caption gallery"
    suffix = PartitionLayout("").gallery_index


class CaptionOutputLink(_OutputObjectLink):
    """The partition's output CSV."""

    name = "Caption output"


class AscendCaptionOperator(CaptionLineageMixin, BaseOperator):
    """Caption every video of one meta partition with Qwen2-VL or PLLaVA under msrun.

    :param meta_path: the partition's meta CSV, ``s3://bucket/key.csv`` (templated)
    :param model: a registered captioner: ``qwen2vl``, ``qwen2_5vl``, ``pllava``, ... (templated)
    :param model_dir: local checkpoint directory on the worker host (templated)
    :param output_uri: output CSV URI; default ``{stem}_caption_{model}{ext}`` beside the input (templated)
    :param caption_options: the caption script's arguments by their seed names, e.g.
        ``{"question": ..., "max_new_tokens": 200, "bs": 1, "fps": 4, "device_target": "Ascend"}`` (templated).
        Options the operator owns (``OWNED_OPTIONS``: meta path, output, model dir, skip flag, allowed roots) are
        refused.
    :param allowed_roots: where the ranks may read videos: absolute local directories and ``s3://bucket/prefix``
        roots, passed to every rank as ``--allowed_root`` (templated; a list). A row whose path lies elsewhere,
        or has a ``..`` segment, fails as that row's failure before anything is read. Not given (None): the
        meta CSV's bucket, ``s3://<bucket>/``. That is what the task was pointed at and what its connection is
        for; a tighter root (video_curation passes its partition's ``incoming/<key>/`` prefix) is better, and
        a partition whose videos live in another bucket or on a local mount must name them. The operator cannot
        know a tighter default (a meta row may name any key), and staying permissive would let whoever writes a
        meta CSV make the NPU hosts read any local file (``/proc/self/environ`` holds the ranks' S3 keys) or
        any bucket the connection can read. ``[]``: no restriction, logged as a warning.
    :param skip_if_existing: return at once, launching nothing, if the output exists and was made with this
        task's settings (default True). An output made with other settings (model, checkpoint, prompt,
        generation or sampling options, dtype: its summary's fingerprint) fails the task, naming both.
    :param recaption: caption such an output again with this task's settings (templated). The old output stays
        readable until the new one replaces it whole; no row made with the old settings is reused.
    :param worker_num: msrun ``--worker_num``, all ranks over all nodes (templated)
    :param local_worker_num: msrun ``--local_worker_num``, ranks on this host (templated)
    :param msrun_options: ``master_addr``, ``master_port`` (default: derived from the task identity, then
        the next free port), ``node_rank``, ``cluster_time_out``, ``join`` (templated). On a multi-node job
        only node 0 takes the partition lease.
    :param log_dir: msrun ``--log_dir`` (templated; default under ``$CAPTION_MSRUN_LOG_ROOT`` per try)
    :param aws_conn_id: Airflow ``aws`` connection whose key, secret and ``endpoint_url`` the ranks get
        through their environment
    :param env: extra environment for the ranks (templated); ``HCCL_CONNECT_TIMEOUT=7200`` by default.
        Tuning variables only (operators.rank_env: MindSpore/HCCL/Ascend/glog families, thread counts,
        locale, ``CAPTION_*`` except the gated ones); ``AIRFLOW*``, ``AWS_*``, ``LD_PRELOAD``, ``PATH`` and
        the like are refused. The rest of the ranks' environment is an allow-list of the worker's.
    :param lease_ttl: seconds a partition lease lives without renewal (renewed every quarter of it)
    :param lease_wait: seconds in all to wait while another attempt holds the partition's lease, then fail
        (retryable: LeaseHeldError). The task waits *without* its pool slot: it looks once, and if the lease is
        held it is rescheduled (``UP_FOR_RESCHEDULE``: the slot and the worker go to other tasks) and looks
        again ``lease_poke`` seconds later, for up to ``lease_wait`` seconds since its first look (over all its
        tries: a retry that finds the lease still held fails at once). When the
        other attempt has published, the next look finds the output and launches nothing.
    :param lease_poke: seconds between those looks (default 30)
    :param seconds_per_video: the try's time budget per video of its shard (default None: none). With it,
        msrun is stopped once ``budget_base + seconds_per_video x rows`` seconds have passed since launch, as
        ``on_kill`` stops it (the ranks journal what is done), and the try fails, retryable. A shard that hangs
        (a stuck collective, a wedged device) then frees its NPUs in a time that fits its size, which one
        DAG-wide ``execution_timeout`` cannot do for shards of different sizes (video_curation sets both).
    :param budget_base: seconds added to that budget for start-up and publishing (default 900)
    :param rank_user: the unprivileged user msrun and the ranks run as (default: ``$CAPTION_RANK_USER`` on the
        worker; unset: the worker's own user). Ranks run FFmpeg on files anyone who may upload videos controls;
        as another user they cannot read the worker's ``/proc/<pid>/environ`` (Fernet key, database URI,
        connections), its working directory or the Airflow home. The worker must be allowed to switch users
        (root in the compose image's ascend worker); the model directory, the interpreter and the project must
        be readable by that user. Not templated: a run's conf cannot choose who the ranks run as.
    :param kill_grace: seconds the ranks get to stop after SIGTERM before SIGKILL. Keep it under 5 s: when
        the task is stopped from outside, Airflow's supervisor SIGKILLs the task's process group 5 s after
        its SIGTERM (msrun and the ranks then die with it; finished rows are journaled either way).
    :param allow_fault_injection: pass ``CAPTION_FAULTS`` to the ranks (reliability drills only)
    :param allow_pickled_weights: accept pickled ``*.bin`` checkpoints. Unpickling runs code stored in the
        file: whoever can write the model directory can then run code on the NPU host. Default: safetensors only.
    """

    template_fields: Sequence[str] = ("meta_path", "model", "model_dir", "output_uri", "caption_options",
                                      "worker_num", "local_worker_num", "msrun_options", "log_dir", "env",
                                      "recaption", "allowed_roots")
    template_fields_renderers = {"caption_options": "json", "msrun_options": "json", "env": "json",
                                 "allowed_roots": "json"}
    ui_color = "#e8f1d4"
    operator_extra_links = (CaptionGalleryLink(), CaptionOutputLink())

    def __init__(self, *, meta_path: str, model: str = "qwen2vl", model_dir: str, output_uri: str | None = None,
                 caption_options: dict[str, Any] | None = None, skip_if_existing: bool = True,
                 worker_num: int = 2, local_worker_num: int = 2, msrun_options: dict[str, Any] | None = None,
                 log_dir: str | None = None, aws_conn_id: str | None = "aws_default",
                 env: dict[str, str] | None = None, lease_ttl: float = 60.0, lease_wait: float = 600.0,
                 lease_poke: float = 30.0, rank_user: str | None = None, seconds_per_video: float | None = None,
                 budget_base: float = 900.0,
                 kill_grace: float = 4.0, allow_fault_injection: bool = False, allow_pickled_weights: bool = False,
                 recaption: bool = False, allowed_roots: list[str] | None = None, **kwargs) -> None:
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
        self.lease_poke = lease_poke
        self.rank_user = rank_user
        self.seconds_per_video = seconds_per_video
        self.budget_base = budget_base
        self.kill_grace = kill_grace
        self.allow_fault_injection = allow_fault_injection
        self.allow_pickled_weights = allow_pickled_weights
        self.recaption = recaption
        self.allowed_roots = allowed_roots  # None: the meta CSV's bucket (_allowed_roots)
        self._recaptioning = False  # the existing output was made with other settings and is being replaced
        self._hook: MsrunHook | None = None
        self._killed = None  # threading.Event, made in execute (operators are deep-copied before it)
        self._parsed: tuple | None = None  # (inputs, caption argv, its parse): the argv is parsed once
        self._config = None  # the RunConfig of that parse, made when the fingerprint needs it

    # -- helpers ----------------------------------------------------------------------------------------
    def _s3_hook(self):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.aws_conn_id)

    def _rank_env(self, hook) -> dict[str, str]:
        """What the operator passes to the ranks on top of the allow-listed worker environment: the DAG's
        ``env``, the S3 settings of the Airflow connection (masked in logs; never on argv)."""
        from airflow.sdk.exceptions import AirflowFailException

        env = {**DEFAULT_ENV, **{str(k): str(v) for k, v in self.env.items()}}
        refused = rank_env.refusals(env, allow_fault_injection=self.allow_fault_injection)
        if refused:
            raise AirflowFailException(f"env may not set {'; '.join(refused)}")
        if self.allow_pickled_weights:
            env[rank_env.PICKLED_WEIGHTS_ENV] = "1"
        if self.aws_conn_id:
            creds = hook.get_credentials()
            env["AWS_ACCESS_KEY_ID"] = creds.access_key
            env["AWS_SECRET_ACCESS_KEY"] = creds.secret_key
            if creds.token:
                env["AWS_SESSION_TOKEN"] = creds.token
            if hook.conn_config.endpoint_url:
                env["AWS_ENDPOINT_URL"] = hook.conn_config.endpoint_url
            env["AWS_DEFAULT_REGION"] = hook.conn_config.region_name or "us-east-1"
        else:  # no connection: the default AWS credential chain of the worker
            env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
        return env

    def _exists(self, hook, uri: str) -> bool:
        bucket, key = split_s3(uri)
        return hook.check_for_key(key, bucket_name=bucket)

    def _check_meta(self, hook) -> int:
        """A partition without a ``path`` column fails here, before msrun starts. Returns its row count (read
        only when ``seconds_per_video`` needs it; 0 otherwise)."""
        from airflow.sdk.exceptions import AirflowFailException

        bucket, key = split_s3(self.meta_path)
        whole = self.seconds_per_video is not None
        try:
            obj = hook.get_key(key, bucket_name=bucket)
            body = (obj.get() if whole else obj.get(Range="bytes=0-65535"))["Body"].read()
        except Exception as err:
            raise AirflowFailException(f"cannot read meta partition {self.meta_path}: {err}") from err
        import csv
        import io

        # utf-8-sig: a byte-order mark before `path` (spreadsheet exports write one) is no part of the name,
        # as for the ranks' reader
        reader = csv.reader(io.StringIO(body.decode("utf-8-sig", errors="replace")))
        header = next(reader, [])
        if "path" not in header:
            raise AirflowFailException(f"{self.meta_path}: no 'path' column (header: {header})")
        return sum(1 for _ in reader) if whole else 0

    def _check_model_dir(self) -> None:
        """A missing or incomplete checkpoint on this host fails here, naming what is missing, before msrun."""
        from airflow.sdk.exceptions import AirflowFailException

        from captioning_core.models import captioner_class
        from captioning_core.models.base import ModelDirError, check_model_dir

        try:
            check_model_dir(self.model_dir, captioner_class(self.model).required_files,
                            allow_pickle=self.allow_pickled_weights)
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
        script, lead = caption_entry(self.model)
        return MsrunSpec(script=script, script_args=lead + script_args, log_dir=self.log_dir or self._default_log_dir(context),
                         worker_num=int(self.worker_num), local_worker_num=int(self.local_worker_num),
                         master_port=int(port), **opts)

    def _caption_args(self) -> tuple[list[str], Any]:
        """The caption script's argv without the skip flag, and its parse by the ranks' own parser: made once
        per set of inputs (``_check_caption_args``), then reused to launch and to fingerprint."""
        inputs = (self.model, self.model_dir, self.output_uri, self.meta_path, repr(self.caption_options),
                  repr(self.allowed_roots))
        if self._parsed is None or self._parsed[0] != inputs:
            self._parsed, self._config = (inputs, *self._check_caption_args()), None
        return self._parsed[1], self._parsed[2]

    def _check_caption_args(self) -> tuple[list[str], Any]:
        """Options the operator owns are refused, and every value is parsed before anything is launched."""
        from airflow.sdk.exceptions import AirflowFailException

        owned = sorted(OWNED_OPTIONS.intersection(self.caption_options))
        if owned:
            raise AirflowFailException(
                f"caption_options may not set {', '.join(owned)}: the operator owns them (use the operator's "
                f"meta_path, output_uri, model_dir, skip_if_existing, allowed_roots and allow_pickled_weights "
                f"arguments)")
        try:
            options = caption_argv(self.caption_options)
        except ValueError as err:
            raise AirflowFailException(f"invalid caption options: {err}") from err
        roots = [f"--allowed_root={root}" for root in self._allowed_roots()]
        args = [f"--pretrained_model_name_or_path={self.model_dir}", f"--output={self.output_uri}", *options,
                *roots, "--", self.meta_path]  # positional after `--`: a meta path is never read as an option
        from captioning_core.arguments import build_parser  # argparse only: no model code is imported

        try:
            return args, build_parser(self.model).parse_args(args)
        except SystemExit as err:
            raise AirflowFailException(f"invalid caption options {self.caption_options}") from err

    def _allowed_roots(self) -> list[str]:
        """The ranks' ``--allowed_root`` values: ``allowed_roots``, checked, or the meta CSV's bucket if None."""
        from airflow.sdk.exceptions import AirflowFailException

        from captioning_core.paths import check_root
        from captioning_core.storage import is_s3

        if self.allowed_roots is None:
            # a meta path that is not on S3 never runs (execute reads it from S3): no default to derive
            return [f"s3://{split_s3(self.meta_path)[0]}/"] if is_s3(str(self.meta_path)) else []
        if not isinstance(self.allowed_roots, list | tuple):
            raise AirflowFailException(f"allowed_roots must render to a list (use render_template_as_native_obj "
                                       f"for a templated list), got {self.allowed_roots!r:.200}")
        roots = [str(root) for root in self.allowed_roots]
        for root in roots:
            try:
                check_root(root)
            except ValueError as err:
                raise AirflowFailException(f"invalid allowed_roots: {err}") from err
        if not roots:
            self.log.warning("allowed_roots is empty: the ranks will read any local path or S3 object a meta row "
                             "names (the S3 connection's own permissions are then the only limit)")
        return roots

    def _script_args(self) -> list[str]:
        """The caption script's argv: ``_caption_args`` with ``--skip_if_existing`` unless recaptioning."""
        args, _ = self._caption_args()
        skip = ["--skip_if_existing"] if self.skip_if_existing and not self._recaptioning else []
        return args[:-2] + skip + args[-2:]

    def _caption_config(self):
        """The RunConfig the ranks will run with, from the one parse; a bad value raises ValueError."""
        from captioning_core.arguments import config_from_args

        _, parsed = self._caption_args()
        if self._config is None:
            self._config = config_from_args(self.model, parsed)
        return self._config

    def _finished(self, hook) -> bool:
        """The output exists and its summary's fingerprint is this task's (nothing to do). An output made with
        other settings fails the task, unless ``recaption`` asks to replace it (then False)."""
        from airflow.sdk.exceptions import AirflowFailException

        from captioning_core import fingerprint, output_identity

        if not self._exists(hook, self.output_uri):
            return False
        self._check_model_dir()  # the checkpoint's identity is part of the fingerprint
        wanted = fingerprint.compute(self._caption_config())
        summary = self._summary(hook, PartitionLayout(self.output_uri).summary)
        found = summary.get(fingerprint.SUMMARY_KEY)
        if found and found.get("id") == wanted["id"]:
            if output_identity.describes_digest(summary, self._output_digest(hook)):
                changed = self._changed_rows(hook)
                if not changed:
                    return True
                # videos replaced in place since the output was made (the meta names other ETags): not
                # finished; the ranks (--skip_if_existing) caption those rows again and reuse the rest
                self.log.warning("%s: %d rows were made for other videos than %s names now (first: row %d): "
                                 "captioning those again", self.output_uri, len(changed), self.meta_path, changed[0])
                return False
            # a replacement with these settings stopped between its summary and its output: the output is
            # still the old one. Not finished; the ranks (--skip_if_existing) finish it from their journal.
            self.log.warning("%s is not the output its summary describes (a replacement with these settings "
                             "stopped before writing it): finishing the replacement", self.output_uri)
            return False
        made_with = fingerprint.describe(found) if found else "settings it did not record (no fingerprint)"
        if str(self.recaption).strip().lower() not in ("true", "1", "yes"):  # a bool, or a rendered template
            raise AirflowFailException(
                f"{self.output_uri} exists but was captioned with {made_with}; this task would caption with "
                f"{fingerprint.describe(wanted)}. Set recaption=True (DAG param 'recaption') to caption the "
                f"partition again with these settings; the old output stays until the new one replaces it.")
        self.log.warning("recaptioning %s: it was made with %s; now %s", self.output_uri, made_with,
                         fingerprint.describe(wanted))
        self._recaptioning = True
        return False

    def _node_rank(self) -> int:
        return int(self.msrun_options.get("node_rank", -1) if isinstance(self.msrun_options, dict) else -1)

    # -- execute ----------------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        import threading

        from airflow.sdk import Asset
        from airflow.sdk.exceptions import AirflowFailException

        from captioning_core.config import default_output

        if self._killed is None:
            self._killed = threading.Event()
        from captioning_core.models import CAPTIONERS

        if self.model not in CAPTIONERS:
            raise AirflowFailException(f"model must be one of {sorted(CAPTIONERS)}, got {self.model!r}")
        for name in ("caption_options", "msrun_options", "env"):
            if not isinstance(getattr(self, name), dict):
                raise AirflowFailException(f"{name} must render to a dict (use render_template_as_native_obj "
                                           f"for a templated dict), got {getattr(self, name)!r:.200}")
        self.output_uri = self.output_uri or default_output(self.meta_path, self.model)
        hook = self._s3_hook()
        summary_uri = PartitionLayout(self.output_uri).summary
        started = time.time()
        launched = False
        if not (self.skip_if_existing and self._finished(hook)):
            rows = self._check_meta(hook)
            self._check_model_dir()
            script_args = self._script_args()
            rank_env = self._rank_env(hook)
            ti = context["ti"]
            lease = None
            if self._node_rank() <= 0:  # one lease per job: node 0's operator holds it for every node
                bucket, key = split_s3(PartitionLayout(self.output_uri).lease)
                lease = S3Lease(hook.get_conn(), bucket, key, holder=f"{ti.dag_id}/{ti.run_id}/"
                                f"{ti.task_id}/{ti.map_index}/try{ti.try_number}", ttl=self.lease_ttl,
                                on_lost=self._lease_lost)
                try:
                    lease.acquire(wait=0, cancel=self._killed)
                except LeaseHeldError as err:
                    self._wait_without_a_slot(context, err)
                rank_env = {**rank_env, **lease.fence().env()}  # the ranks publish only while we hold it
            try:
                if self.skip_if_existing and not self._recaptioning and self._finished(hook):
                    self.log.info("another attempt finished %s while we waited", self.output_uri)
                elif self._killed.is_set():
                    raise RuntimeError("the task was killed before msrun started; nothing launched")
                else:
                    self._hook = MsrunHook(self._spec(context, script_args), rank_env, kill_grace=self.kill_grace,
                                           allow_fault_injection=self.allow_fault_injection,
                                           run_as=self.rank_user or os.environ.get("CAPTION_RANK_USER") or None)
                    if self._killed.is_set():  # on_kill ran while the hook was being made
                        self._hook.kill()
                    launched = True
                    self._run_hook(lease, rows)
            finally:
                if lease is not None:
                    lease.release()
        else:
            self.log.info("output exists, nothing to launch: %s", self.output_uri)
        result = self._result(hook, summary_uri, started, launched)
        context["outlet_events"][AssetAlias(CAPTIONS_ALIAS)].add(Asset(self.output_uri), extra=result)
        self.lineage_result = result
        return result

    def _wait_without_a_slot(self, context: Context, held: LeaseHeldError) -> None:
        """Another attempt holds the partition: give the pool slot back and look again later (reschedule),
        for up to ``lease_wait`` seconds since this try's first look; then fail, retryable."""
        from datetime import UTC, datetime, timedelta

        from airflow.sdk.exceptions import AirflowRescheduleException

        now = datetime.now(UTC)
        first = context["ti"].get_first_reschedule_date(context)
        waited = (now - first).total_seconds() if first is not None else 0.0
        if waited + self.lease_poke > self.lease_wait:
            raise LeaseHeldError(f"{held}; waited {waited:.0f}s of lease_wait {self.lease_wait:.0f}s") from held
        self.log.info("%s; rescheduled to look again in %.0fs, its pool slot released (waited %.0fs of %.0fs)",
                      held, self.lease_poke, waited, self.lease_wait)
        raise AirflowRescheduleException(now + timedelta(seconds=self.lease_poke))

    def _run_hook(self, lease: S3Lease | None, rows: int) -> None:
        hook = self._hook
        assert hook is not None
        timers = []
        if self.seconds_per_video is not None:
            budget = self.budget_base + float(self.seconds_per_video) * rows
            why = (f"the shard's time budget ran out: {rows} videos x {float(self.seconds_per_video):g} s + "
                   f"{self.budget_base:g} s = {budget:g} s")
            timers.append(threading_timer(budget, lambda: hook.kill(reason=why)))
        if lease is not None:
            timers.append(threading_timer(2.0, lambda: hook.proc is not None and lease.record_child(hook.proc.pid)))
        try:
            hook.run()
        finally:
            for timer in timers:
                timer.cancel()
        if lease is None:
            return
        if lease.lost:  # msrun may have ended by itself just as the lease went: the attempt still fails
            raise RuntimeError(lease.lost)

    def _lease_lost(self, why: str) -> None:
        if self._hook is not None:
            self._hook.kill(reason=why)
        elif self._killed is not None:
            self._killed.set()

    def _changed_rows(self, hook) -> list[int]:
        """Rows of the output made for another video than the meta names now (``output_identity``)."""
        from captioning_core.output_identity import changed_rows

        def read(uri: str) -> bytes:
            bucket, key = split_s3(uri)
            return hook.get_key(key, bucket_name=bucket).get()["Body"].read()

        return changed_rows(read(self.meta_path), read(self.output_uri), self.meta_path, self.output_uri)

    def _output_digest(self, hook) -> str:
        """SHA-256 of the output object, streamed."""
        from captioning_core.output_identity import digest_of_chunks

        bucket, key = split_s3(self.output_uri)
        return digest_of_chunks(hook.get_key(key, bucket_name=bucket).get()["Body"].iter_chunks(1 << 20))

    def _summary(self, hook, summary_uri: str) -> dict:
        """The summary the ranks wrote; for an output made elsewhere (no summary), counts from the CSV."""
        from captioning_core.storage import is_not_found

        bucket, key = split_s3(summary_uri)
        try:
            return json.loads(hook.read_key(key, bucket_name=bucket))
        except Exception as err:
            if not is_not_found(err):
                raise
        import csv
        import io

        bucket, key = split_s3(self.output_uri)
        rows = list(csv.DictReader(io.StringIO(hook.read_key(key, bucket_name=bucket))))
        ok = [r for r in rows if r.get("caption_status", "ok" if r.get("text") else "failed") == "ok"]
        return {"rows": len(rows), "captioned": len(ok), "failed": len(rows) - len(ok),
                "empty": sum(1 for r in ok if not (r.get("text") or "").strip())}

    def _rank_stats(self, hook) -> list[dict]:
        """Every rank's stats records, read after msrun exited. Not the summary's copy: the rank that publishes
        can finish before another rank has written its record for this try."""
        from captioning_core import stats

        bucket, prefix = split_s3(PartitionLayout(self.output_uri).stats)
        keys = hook.list_keys(bucket_name=bucket, prefix=prefix) or []
        return stats.load_records([f"s3://{bucket}/{key}" for key in keys],
                                  lambda uri: hook.read_key(split_s3(uri)[1], bucket_name=bucket))

    def _result(self, hook, summary_uri: str, started: float, launched: bool) -> dict[str, Any]:
        """The task's XCom: the partition's counts from the summary, and this try's figures (``stats.merge`` of
        the ranks this try started; ``output_tokens_per_row`` is kept as this try's, the same figure as
        ``attempt_output_tokens_per_row``; ``partition_output_tokens_per_row`` is the summary's)."""
        from captioning_core import stats

        summary = self._summary(hook, summary_uri)
        this_try = stats.merge(stats.since(self._rank_stats(hook), started) if launched else [], digits=4)
        return {"output": self.output_uri, "rows": summary["rows"], "captioned": summary["captioned"],
                "failed": summary["failed"], "empty": summary.get("empty", 0),
                "skipped": this_try["skipped"] if launched else summary["rows"], "launched": launched,
                **{k: v for k, v in this_try.items() if k != "skipped"},
                "output_tokens_per_row": this_try["attempt_output_tokens_per_row"],
                "partition_output_tokens_per_row": summary.get("partition_output_tokens_per_row")}

    def on_kill(self) -> None:
        """Called by the task runner from its SIGTERM handler (and after execution_timeout): only signals."""
        if self._killed is not None:
            self._killed.set()
        if self._hook is not None:
            self._hook.kill(reason="the task was killed (on_kill: SIGTERM to the ranks, SIGKILL after "
                                   f"{self.kill_grace:g}s)")


def threading_timer(delay: float, fn):
    """A started daemon ``threading.Timer``."""
    import threading

    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()
    return timer
