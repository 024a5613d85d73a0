"""The captioners beyond the seeds' two, end to end: the operator in a DAG run, msrun with 2 CPU workers, S3.

Through the drill DAG (tests/airflow_dags/caption_drill.py) under `airflow dags test`, with the model chosen by
the DAG param, as a user picks it in the trigger form. Each tiny model (trained by tools/, shipped in
tiny_models/) must caption the clip factory's held-out partition clips exactly.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from testkit.airflow_env import AirflowEnv
from testkit.clips import ensure_clip
from testkit.demo_clips import PARTITION_SPECS
from testkit.partition import upload_partition
from testkit.profile import TINY

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
DAGS = Path(__file__).resolve().parent / "airflow_dags"
SPECS = PARTITION_SPECS[:6]
# What each tiny model was trained with (Qwen3-VL: its checkpoint's video processor settings).
OPTIONS = {"qwen2_5vl": {"device_target": "CPU", "max_new_tokens": 12, "log_every": 5, **TINY.caption_options()},
           "qwen3vl": {"device_target": "CPU", "max_new_tokens": 12, "log_every": 5}}


@pytest.mark.parametrize("model", ["qwen2_5vl", "qwen3vl"])
def test_dag_run_captions_the_held_out_clips(model, s3_server, s3_bucket, tmp_path):
    import pandas as pd

    client = s3_server.client()
    clips = [(ensure_clip(spec, tmp_path / "clips"), spec, "good") for spec in SPECS]
    meta, rows = upload_partition(client, s3_bucket, f"models/{model}", clips)
    output = meta.replace("meta.csv", "captions.csv")
    env = AirflowEnv(tmp_path / "airflow", s3_server.env(), "postgresql://unused", dags_folder=DAGS)
    env.migrate()
    conf = {"meta_path": meta, "output_uri": output, "model": model, "model_dir": str(REPO / "tiny_models" / model),
            "caption_options": {**OPTIONS[model], "bs": 4}}
    run = env.dags_test("caption_drill", "2026-11-21", conf)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]

    bucket, _, key = output[len("s3://"):].partition("/")
    out = pd.read_csv(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read()), dtype=str,
                      keep_default_na=False)
    by_path = dict(zip(out["path"], zip(out["caption_status"], out["text"], strict=True), strict=True))
    assert len(out) == len(rows) == len(SPECS)
    for row in rows:
        assert by_path[row.path] == ("ok", row.spec.caption), f"{model}: {row.path}"
    log = run.stdout + run.stderr
    assert "caption.py" in log and model in log  # the generic entry script ran this model under msrun
