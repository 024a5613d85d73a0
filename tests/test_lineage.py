"""OpenLineage, live: the caption task (with plugins/operators/lineage.py's mixin) captions a partition under
real msrun, and the provider's console transport prints the COMPLETE event with the input partition and the
output caption CSV as datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from testkit.airflow_env import TINY_CAPTION_OPTIONS, TINY_QWEN2VL, AirflowEnv
from testkit.clips import ensure_clip
from testkit.demo_clips import DAG_SPECS
from testkit.partition import upload_partition

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]
DAGS = Path(__file__).resolve().parent / "airflow_dags"


def _events(text: str) -> list[dict]:
    """OpenLineage events printed by the console transport (one JSON object per log record)."""
    events = []
    decoder = json.JSONDecoder()
    for match in re.finditer(r'\{"eventTime"|\{\s*"eventTime"', text):
        try:
            obj, _ = decoder.raw_decode(text[match.start():])
        except ValueError:
            continue
        events.append(obj)
    return events


def test_caption_task_reports_partition_and_output_datasets(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    clips = [(ensure_clip(spec, tmp_path / "clips"), spec, "good") for spec in DAG_SPECS[:2]]
    meta, rows = upload_partition(client, s3_bucket, "lineage/2026-11-20/shard-0000", clips)
    output = meta.replace("meta.csv", "meta_caption_qwen2vl.csv")
    env = AirflowEnv(tmp_path / "airflow", s3_server.env(), "postgresql://unused", dags_folder=DAGS,
                     extra={"AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "console"}),
                            "AIRFLOW__OPENLINEAGE__NAMESPACE": "ascend-caption"})
    env.migrate()
    proc = env.dags_test("caption_lineage", "2026-11-20",
                         {"meta_path": meta, "model_dir": str(TINY_QWEN2VL), "caption_options": TINY_CAPTION_OPTIONS})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    events = [e for e in _events(text) if e.get("job", {}).get("name") == "caption_lineage.caption"]
    complete = [e for e in events if e.get("eventType") == "COMPLETE"]
    assert complete, text[-5000:]
    event = complete[-1]
    bucket = s3_bucket
    assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [
        (f"s3://{bucket}", "lineage/2026-11-20/shard-0000/meta.csv")]
    assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [
        (f"s3://{bucket}", output.split("/", 3)[3])]
    assert event["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == len(rows)
    assert any(e.get("eventType") == "START" and e["inputs"] for e in events)
    assert s3_server.env()["AWS_SECRET_ACCESS_KEY"] not in text
