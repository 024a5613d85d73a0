"""The caption operator as users run it, for the live OpenLineage test (its lineage: plugins/operators/lineage.py)."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from operators.ascend_caption import AscendCaptionOperator

with DAG(
    dag_id="caption_lineage",
    schedule=None,
    start_date=datetime(2026, 11, 1),
    render_template_as_native_obj=True,
    params={"meta_path": Param(type="string"), "model_dir": Param(type="string"),
            "caption_options": Param({}, type="object")},
) as dag:
    AscendCaptionOperator(
        task_id="caption",
        meta_path="{{ params.meta_path }}",
        model_dir="{{ params.model_dir }}",
        caption_options="{{ params.caption_options }}",
        worker_num=2,
        local_worker_num=2,
        aws_conn_id="caption_s3",
        retries=0,
    )
