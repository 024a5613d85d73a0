"""One tenant's caption DAG for the gallery-scope drill (tests/test_gallery_scope.py).

The drill copies this file into one DAG bundle per team; the bundle's folder names the DAG (``tenant_a``,
``tenant_b``). The caption task writes under ``s3://{{ params.bucket }}/<tenant>/``: the API server derives
that prefix from the serialized task. ``plant`` is what hostile task code in a DAG can do: record, as its own
extra-link XCom, a link (``params.plant``) naming another DAG's output.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG, Param, task

from operators.ascend_caption import AscendCaptionOperator

TENANT = Path(__file__).resolve().parent.name

with DAG(
    dag_id=f"tenant_{TENANT}",
    schedule=None,
    start_date=datetime(2026, 11, 1),
    render_template_as_native_obj=True,
    params={
        "bucket": Param(type="string"),
        "meta_path": Param(type="string"),
        "model_dir": Param(os.environ.get("CAPTION_MODEL_DIR", ""), type="string"),
        "caption_options": Param({}, type="object"),
        "plant": Param("", type="string"),
    },
) as dag:
    AscendCaptionOperator(
        task_id="caption",
        meta_path="{{ params.meta_path }}",
        output_uri="s3://{{ params.bucket }}/" + TENANT + "/{{ run_id | replace(':', '-') }}/captions.csv",
        model_dir="{{ params.model_dir }}",
        caption_options="{{ params.caption_options }}",
        worker_num=2,
        local_worker_num=2,
        aws_conn_id="caption_s3",
    )

    @task
    def plant(**context) -> None:
        if context["params"]["plant"]:
            context["ti"].xcom_push(key="_link_CaptionOutputLink", value=context["params"]["plant"])

    plant()
