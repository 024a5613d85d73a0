"""One AscendCaptionOperator over one partition, every templated field from params: the drills' DAG.

Only tests load this folder (testkit.airflow_env.AirflowEnv with ``dags_folder``); production DAGs live in
``dags/``. Retries come from CAPTION_RETRIES with a 1 s delay so a retry drill runs in seconds. Fault injection
is allowed here (``allow_fault_injection=True``; drills set CAPTION_FAULTS), never in production DAGs.
CAPTION_EXECUTION_TIMEOUT, CAPTION_KILL_GRACE, CAPTION_LEASE_TTL, CAPTION_LEASE_POKE, CAPTION_LEASE_WAIT,
CAPTION_SECONDS_PER_VIDEO and CAPTION_BUDGET_BASE (seconds) tune the kill, lease and budget drills.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from operators.ascend_caption import AscendCaptionOperator

with DAG(
    dag_id="caption_drill",
    schedule=None,
    start_date=datetime(2026, 11, 1),
    render_template_as_native_obj=True,
    params={
        "meta_path": Param(type="string"),
        "model": Param("qwen2vl", type="string"),
        "output_uri": Param(type="string"),
        "model_dir": Param(os.environ.get("CAPTION_MODEL_DIR", ""), type="string"),
        "caption_options": Param({}, type="object"),
        "env": Param({}, type="object"),
        "recaption": Param(False, type="boolean"),
    },
) as dag:
    AscendCaptionOperator(
        task_id="caption",
        meta_path="{{ params.meta_path }}",
        model="{{ params.model }}",
        output_uri="{{ params.output_uri }}",
        model_dir="{{ params.model_dir }}",
        caption_options="{{ params.caption_options }}",
        env="{{ params.env }}",
        recaption="{{ params.recaption }}",
        worker_num=2,
        local_worker_num=2,
        aws_conn_id="caption_s3",
        retries=int(os.environ.get("CAPTION_RETRIES", "1")),
        retry_delay=timedelta(seconds=1),
        allow_fault_injection=True,
        kill_grace=float(os.environ.get("CAPTION_KILL_GRACE", "4")),
        lease_ttl=float(os.environ.get("CAPTION_LEASE_TTL", "60")),
        lease_poke=float(os.environ.get("CAPTION_LEASE_POKE", "3")),
        lease_wait=float(os.environ.get("CAPTION_LEASE_WAIT", "600")),
        seconds_per_video=float(os.environ["CAPTION_SECONDS_PER_VIDEO"])
        if os.environ.get("CAPTION_SECONDS_PER_VIDEO") else None,
        budget_base=float(os.environ.get("CAPTION_BUDGET_BASE", "900")),
        execution_timeout=timedelta(seconds=float(os.environ["CAPTION_EXECUTION_TIMEOUT"]))
        if os.environ.get("CAPTION_EXECUTION_TIMEOUT") else None,
    )
