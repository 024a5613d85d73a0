"""scrape -> filter -> caption -> train, one DAG run per partition key (one day of incoming videos).

Partitions are Airflow's own: the DAG's timetable is a daily ``CronPartitionTimetable`` (key format
``YYYY-MM-DD``), so every scheduled, backfilled or manual run carries ``dag_run.partition_key``:
``airflow backfill create --from-date D1 --to-date D3`` makes one run per day key, ``airflow dags clear
--partition-key D`` re-runs one key, and a manual run for any key is ``POST /api/v2/dags/video_curation/dagRuns``
with ``{"partition_key": "D"}`` (or the trigger form). We chose it over a plain ``@daily`` cron (keys derived
from ``ds``) because the key is then a first-class, filterable column of the run (grid, API, clear, backfill
dedup) and a ``PartitionedAssetTimetable`` consumer (train_on_manifest) receives the same key on its run.
The key names everything downstream: the S3 prefixes ``incoming/<key>/``, ``meta/<key>/`` and
``manifests/<key>/``, the shards, and the metadata table's partition. ``airflow dags test DAG DATE`` (no
partition key on such a run) falls back to ``params.partition_key``, then to ``ds``, which has the same format.

What the ranks may read: every caption task gets ``allowed_roots=["s3://<bucket>/<incoming_prefix>/<key>/"]``,
the prefix its run's scrape listed (it arrives with the shard's ``meta_path`` from the filter task), so a meta
row that names another partition, another bucket or a local file fails as that row's failure, unread.

Concurrency: caption tasks run on the ``ascend`` Celery queue, one slot of pool ``ascend_npus`` each (size it
hosts x NPUs per host / NPUs per task), at most ``CAPTION_MAX_PER_RUN`` per run; ``max_active_runs`` bounds the
runs in flight, for backfills too (``--max-active-runs`` lowers it per backfill).

Wiring only: every import that is heavy or touches a service happens inside a task at run time.
Connections: ``caption_s3`` (aws, with ``endpoint_url`` in extra) and ``curation_db`` (postgres); the caption task
uses ``$CAPTION_TASK_S3_CONN_ID`` instead of ``caption_s3`` when set.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta

from airflow.sdk import DAG, Asset, CronPartitionTimetable, Param, task

from captioning_core.models import CAPTIONERS
from curation.steps import Thresholds
from operators.ascend_caption import AscendCaptionOperator

_THRESHOLDS = Thresholds()
S3_CONN = os.environ.get("CAPTION_S3_CONN_ID", "caption_s3")
DB_CONN = os.environ.get("CAPTION_DB_CONN_ID", "curation_db")
# The caption task's connection, whose credentials the ranks get: give it one scoped to reading incoming/ and
# reading and writing meta/ (README, "S3 credentials for the ranks"); scrape, filter and train keep S3_CONN.
CAPTION_TASK_S3_CONN = os.environ.get("CAPTION_TASK_S3_CONN_ID", S3_CONN)
# Named, not an s3:// URI: an s3 URI makes every DAG parse initialise the providers manager (~0.6 s).
MANIFEST_ASSET = Asset(name="video_training_manifest")
PARTITION_KEY_FORMAT = "%Y-%m-%d"
# One slot per caption task; size it hosts x NPUs per host / NPUs per task (README, "Running on Ascend hosts").
CAPTION_POOL = os.environ.get("CAPTION_POOL", "ascend_npus")
# scrape, filter and train talk to PostgreSQL and S3: a server restart or a network blip fails the try (each
# DB write is one transaction and every step is idempotent), and the next try completes it. The caption task
# sets its own retries (CAPTION_RETRIES).
DEFAULT_ARGS = {
    "retries": int(os.environ.get("CURATION_RETRIES", "3")),
    "retry_delay": timedelta(seconds=int(os.environ.get("CURATION_RETRY_DELAY_SECONDS", "30"))),
}


def _partition_key(context) -> str:
    key = context.get("partition_key") or context["params"].get("partition_key") or context.get("ds")
    if not key:  # a run with no logical date and no key: name it after the run
        key = re.sub(r"[^A-Za-z0-9_.=-]+", "_", context["run_id"])
    return str(key)


def _incoming(params, key: str) -> str:
    """The key prefix the partition's videos land under, ``<incoming_prefix>/<key>`` (no trailing slash)."""
    return f"{params['incoming_prefix']}/{key}"


def _s3():
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=S3_CONN).get_conn()


def _db():
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    return PostgresHook(postgres_conn_id=DB_CONN).get_conn()


with DAG(
    dag_id="video_curation",
    description="scrape -> filter -> caption (AscendCaptionOperator, mapped per shard) -> train manifest",
    schedule=CronPartitionTimetable("0 0 * * *", timezone="UTC", key_format=PARTITION_KEY_FORMAT),
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=int(os.environ.get("CURATION_MAX_ACTIVE_RUNS", "2")),
    default_args=DEFAULT_ARGS,
    render_template_as_native_obj=True,  # params.caption_options renders as a dict, worker_num as an int
    tags=["video", "captioning"],
    params={
        "partition_key": Param(None, type=["null", "string"], description="override the run's date key"),
        "bucket": Param("curation", type="string"),
        "incoming_prefix": Param("incoming", type="string", description="videos land under <prefix>/<key>/"),
        "meta_prefix": Param("meta", type="string"),
        "manifest_prefix": Param("manifests", type="string"),
        "shard_size": Param(500, type="integer", minimum=1, description="videos per new meta shard; a video "
                            "keeps its shard, new videos go to new shards"),
        "recaption": Param(False, type="boolean", description="caption shards whose output was made with other "
                           "settings (model, checkpoint, prompt, options) again; without it such a shard fails"),
        "retry_failed": Param(False, type="boolean", description="re-queue videos whose caption ended failed "
                              "into a new shard (nothing re-queues them otherwise)"),
        # the filter's thresholds; defaults are curation.steps.Thresholds' own
        "min_frames": Param(_THRESHOLDS.min_frames, type="integer", minimum=1),
        "min_fps": Param(_THRESHOLDS.min_fps, type="number"),
        "min_height": Param(_THRESHOLDS.min_height, type="integer"),
        "min_width": Param(_THRESHOLDS.min_width, type="integer"),
        "max_seconds": Param(_THRESHOLDS.max_seconds, type="number"),
        "max_pixels": Param(_THRESHOLDS.max_pixels, type="integer", minimum=1, description="drop videos whose "
                            "stored frame has more pixels (a small file can declare a huge picture; ranks decode it)"),
        "max_frames": Param(_THRESHOLDS.max_frames, type="integer", minimum=1, description="drop longer videos"),
        "model": Param("qwen2vl", enum=sorted(CAPTIONERS)),
        "model_dir": Param(os.environ.get("CAPTION_MODEL_DIR", "pretrained_models/Qwen2-VL-7B-Instruct"),
                           type="string"),
        "caption_options": Param({}, type="object", description="caption script arguments by seed name"),
        "worker_num": Param(int(os.environ.get("CAPTION_WORKER_NUM", "2")), type="integer", minimum=1),
    },
) as dag:

    @task
    def scrape(**context) -> str:
        from curation import steps

        key = _partition_key(context)
        p = context["params"]
        conn = _db()
        try:
            steps.scrape(_s3(), conn, p["bucket"], _incoming(p, key), key)
        finally:
            conn.close()
        return key

    @task(task_id="filter")
    def filter_videos(key: str, **context) -> list[dict]:
        from curation import steps

        p = context["params"]
        conn = _db()
        try:
            shards = steps.filter_partition(_s3(), conn, key, steps.thresholds_from_params(p), p["bucket"],
                                            p["meta_prefix"], int(p["shard_size"]), bool(p["retry_failed"]))
        finally:
            conn.close()
        # the caption task's kwargs per shard: it may read only what scrape registered for this key
        roots = [f"s3://{p['bucket']}/{_incoming(p, key).rstrip('/')}/"]
        return [{**shard, "allowed_roots": roots} for shard in shards]

    @task(outlets=[MANIFEST_ASSET])
    def train(key: str, shards: list[dict], captions: list[dict], **context) -> dict:
        from curation import steps

        p = context["params"]
        conn = _db()
        try:
            written = steps.write_back(_s3(), conn, key, list(captions), p["model"], list(shards))
            manifest = steps.write_manifest(_s3(), conn, key, p["bucket"], p["manifest_prefix"])
        finally:
            conn.close()
        manifest["captions_written"] = written
        context["outlet_events"][MANIFEST_ASSET].extra = manifest
        return manifest

    key = scrape()
    shards = filter_videos(key)
    captions = AscendCaptionOperator.partial(
        task_id="caption",
        model="{{ params.model }}",
        model_dir="{{ params.model_dir }}",
        caption_options="{{ params.caption_options }}",
        recaption="{{ params.recaption }}",
        worker_num="{{ params.worker_num }}",
        local_worker_num="{{ params.worker_num }}",
        aws_conn_id=CAPTION_TASK_S3_CONN,
        queue=os.environ.get("CAPTION_QUEUE", "ascend"),
        map_index_template="{{ task.meta_path.split('/')[-2] }}",
        pool=CAPTION_POOL,
        max_active_tis_per_dagrun=int(os.environ.get("CAPTION_MAX_PER_RUN", "2")),
        # A retry on another host waits for the dead try's partition lease to expire: keep it short where
        # hosts can vanish (the lease is renewed every ttl/3 while msrun runs).
        lease_ttl=float(os.environ.get("CAPTION_LEASE_TTL_SECONDS", "60")),
        # Another run of the key holds the lease: look again this often, rescheduled, without a pool slot.
        lease_poke=float(os.environ.get("CAPTION_LEASE_POKE_SECONDS", "30")),
        retries=int(os.environ.get("CAPTION_RETRIES", "2")),
        retry_delay=timedelta(seconds=int(os.environ.get("CAPTION_RETRY_DELAY_SECONDS", "60"))),
        # A try's time budget follows its shard: seconds per video x its rows + a base for start-up and publish
        # (the operator stops msrun, the ranks journal what is done, the try fails and is retried);
        # execution_timeout stays the outer bound of any try.
        seconds_per_video=float(os.environ.get("CAPTION_SECONDS_PER_VIDEO", "120")),
        budget_base=float(os.environ.get("CAPTION_BUDGET_BASE_SECONDS", "900")),
        execution_timeout=timedelta(hours=float(os.environ.get("CAPTION_EXECUTION_TIMEOUT_HOURS", "24"))),
    ).expand_kwargs(shards)
    train(key, shards, captions.output)
