"""An existing output made with other settings is never silently accepted (real Airflow, msrun, SeaweedFS).

Through the drill DAG (tests/airflow_dags/caption_drill.py) under `airflow dags test`: a partition captioned
with one prompt, then asked for with another. Without `recaption` the task fails up front, naming both
fingerprints, and nothing is launched or rewritten; with `recaption` the partition is captioned again with
the new settings (no old row reused) and the output is replaced whole; a rerun then finds it current.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from testkit.airflow_env import TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.clips import ensure_clip
from testkit.demo_clips import PARTITION_SPECS
from testkit.partition import upload_partition

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]

DAGS = Path(__file__).resolve().parent / "airflow_dags"
NEW_QUESTION = "Describe the video in one short sentence"


def _object(client, uri: str) -> bytes:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_other_settings_fail_up_front_and_recaption_replaces_the_output(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    clips = [(ensure_clip(spec, tmp_path / "clips"), spec, "good") for spec in PARTITION_SPECS[:3]]
    meta, rows = upload_partition(client, s3_bucket, "fingerprint", clips)
    output = meta.replace("meta.csv", "captions.csv")
    env = AirflowEnv(tmp_path / "airflow", s3_server.env(), "postgresql://unused", dags_folder=DAGS,
                     extra={"CAPTION_RETRIES": "1"})
    env.migrate()

    def run(question: str | None = None, recaption: bool = False):
        options = {**TINY_CAPTION_OPTIONS, **({"question": question} if question else {})}
        conf = {"meta_path": meta, "output_uri": output, "caption_options": options, "recaption": recaption}
        return env.dags_test("caption_drill", "2026-11-21", conf)

    def summary() -> dict:
        return json.loads(_object(client, output + ".summary.json"))

    first = run()
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-3000:]
    old_fp = summary()["fingerprint"]
    old_output = hashlib.sha256(_object(client, output)).hexdigest()

    refused = run(NEW_QUESTION)
    assert refused.returncode != 0
    log = refused.stdout + refused.stderr
    assert "exists but was captioned with" in log and old_fp["id"] in log, log[-5000:]
    tries = [(t, s) for run_id, t, s in env.task_tries("caption_drill", "caption")]
    assert tries[-1] == (1, "failed")  # failed up front, no retry
    assert hashlib.sha256(_object(client, output)).hexdigest() == old_output
    assert summary()["fingerprint"] == old_fp

    again = run(NEW_QUESTION, recaption=True)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-3000:]
    new_fp = summary()["fingerprint"]
    assert new_fp["id"] != old_fp["id"] and new_fp["prompt"]["question"] == NEW_QUESTION
    results = [r for _, _, r in env.task_results("caption_drill", "caption")]
    assert (results[-1]["launched"], results[-1]["rows"], results[-1]["skipped"]) == (True, len(rows), 0)

    current = run(NEW_QUESTION, recaption=True)  # the output is now current: nothing to launch
    assert current.returncode == 0, current.stdout[-5000:] + current.stderr[-3000:]
    assert env.task_results("caption_drill", "caption")[-1][2]["launched"] is False
