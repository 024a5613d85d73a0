"""Retries that are idempotent and right, with the real stage: Qwen2-VL under real msrun (2 CPU workers) on
SeaweedFS. Environment failures (credentials, model runtime, a crash mid-publish) leave the partition
unpublished with a non-zero exit, and the next attempt completes it with every row right; changed settings
never reuse a caption made under the old ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from captioning_core import arguments
from testkit.clips import ClipSpec, ensure_clip
from testkit.outputs import assert_row_captions, read_csv_from_s3
from testkit.partition import meta_csv, upload_partition
from testkit.paths import REPO, TINY_QWEN2VL
from testkit.profile import TINY, TINY_ARGS

pytestmark = [pytest.mark.integration, pytest.mark.msrun]
OUT = "meta_caption_qwen2vl.csv"


@pytest.fixture(scope="module")
def good_clips(tmp_path_factory):
    from testkit.demo_clips import PARTITION_SPECS

    directory = tmp_path_factory.mktemp("retry-clips")
    return [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS[:6]]


def _get(client, bucket: str, key: str) -> bytes | None:
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def _loaded_model(result) -> bool:
    return any("loaded " in line for lines in result.rank_logs().values() for line in lines)


def _fp_id(*args: str) -> str:
    return arguments.for_script_args("qwen2vl", ["m.csv", "--pretrained_model_name_or_path", str(TINY_QWEN2VL),
                                                 *TINY_ARGS, *args])["id"]


def test_wrong_secret_fails_the_attempt_before_any_model_load_and_the_right_one_captions_all(
        s3_server, s3_bucket, good_clips, run_msrun, tmp_path):
    """The issue's first report: a local meta listing S3 videos, run with a wrong secret. Before, exit 0 and
    every row published as failed for good; now no output, non-zero, no model loaded; then the right secret
    captions every row."""
    client = s3_server.client()
    s3_meta, rows = upload_partition(client, s3_bucket, "creds", good_clips[:4])
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv(rows))
    output = tmp_path / OUT
    bad = run_msrun(str(meta), *TINY_ARGS, "--skip_if_existing", log_dir=tmp_path / "log1",
                    env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert bad.returncode != 0, bad.tail
    assert not output.exists()
    assert not _loaded_model(bad), bad.tail
    logs = [line for lines in bad.rank_logs().values() for line in lines]
    assert any("cannot read the first pending video" in line and "model not loaded" in line for line in logs)
    assert any("left for the next attempt" in line and "partition not published" in line for line in logs)
    assert not any("not-the-secret" in line for line in logs)

    good = run_msrun(str(meta), *TINY_ARGS, "--skip_if_existing", log_dir=tmp_path / "log2")
    assert good.returncode == 0, good.tail
    import pandas as pd

    out = pd.read_csv(output, dtype=str, keep_default_na=False)
    assert out["path"].tolist() == [r.path for r in rows]
    assert_row_captions(out, rows)
    summary = json.loads((tmp_path / f"{OUT}.summary.json").read_text())
    assert summary["fingerprint"]["id"] == _fp_id()


def test_runtime_fault_in_try_1_is_retried_by_try_2(s3_server, s3_bucket, good_clips, run_msrun, tmp_path):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "runtime", good_clips[:4])
    fault = {"CAPTION_FAULTS": "runtime@*/try1"}
    first = run_msrun(meta, *TINY_ARGS, "--skip_if_existing", log_dir=tmp_path / "log1",
                      env={**fault, "AIRFLOW_CTX_TRY_NUMBER": "1"})
    assert first.returncode != 0, first.tail
    assert _get(client, s3_bucket, f"runtime/{OUT}") is None
    assert _get(client, s3_bucket, f"runtime/{OUT}.summary.json") is None
    for lines in first.rank_logs().values():
        assert any("injected model-runtime error" in line for line in lines)
        assert any("2 of 2 rows left for the next attempt" in line for line in lines), lines[-5:]

    second = run_msrun(meta, *TINY_ARGS, "--skip_if_existing", log_dir=tmp_path / "log2",
                       env={**fault, "AIRFLOW_CTX_TRY_NUMBER": "2"})
    assert second.returncode == 0, second.tail
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", OUT))
    assert_row_captions(out, rows)
    assert set(out["caption_error"]) == {""}


def test_changed_settings_never_publish_a_caption_made_under_the_old_ones(
        s3_server, s3_bucket, good_clips, run_msrun, tmp_path):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "settings", good_clips)
    parts = f"settings/{OUT}.parts/"
    first = run_msrun(meta, *TINY_ARGS, "--journal_flush_rows", "1", log_dir=tmp_path / "log1",
                      env={"CAPTION_FAULTS": "sigkill@1:2"})
    assert first.returncode != 0
    old_records = _records(client, s3_bucket, parts)
    old_id = _fp_id()
    assert old_records and {r["fingerprint"] for r in old_records} == {old_id}

    new_args = ("--question", "Which way does the shape move?", "--max_new_tokens", "10")
    started = time.time()
    second = run_msrun(meta, *TINY_ARGS, *new_args, log_dir=tmp_path / "log2")
    assert second.returncode == 0, second.tail
    new_id = _fp_id(*new_args)
    assert new_id != old_id
    summary = json.loads(_get(client, s3_bucket, f"settings/{OUT}.summary.json"))
    assert summary["fingerprint"]["id"] == new_id
    assert summary["fingerprint"]["prompt"]["question"] == "Which way does the shape move?"
    latest = [s for s in summary["ranks"] if s["started_at"] >= started]
    assert sum(s["rows_skipped"] for s in latest) == 0  # nothing made under the old settings was reused
    assert sum(s["rows_processed"] for s in latest) == len(rows)
    assert {r["fingerprint"] for r in _records(client, s3_bucket, parts)} == {new_id}  # compacted to the new ones
    index = _get(client, s3_bucket, f"settings/{OUT}.gallery/index.html").decode()
    assert f'data-fingerprint="{new_id}"' in index and "Which way does the shape move?" in index
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", OUT))
    assert out["path"].tolist() == [r.path for r in rows] and set(out["caption_status"]) == {"ok"}


def _records(client, bucket: str, prefix: str) -> list[dict]:
    out = []
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        if obj["Key"].endswith(".jsonl"):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            out.extend(json.loads(line) for line in body.splitlines() if line.strip())
    return out


def test_crash_between_gallery_and_output_is_completed_by_the_retry(
        s3_server, s3_bucket, good_clips, run_msrun, tmp_path):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "commit", good_clips[:4])
    fault = {"CAPTION_FAULTS": "crash_publish@*/try1"}
    first = run_msrun(meta, *TINY_ARGS, "--skip_if_existing", log_dir=tmp_path / "log1",
                      env={**fault, "AIRFLOW_CTX_TRY_NUMBER": "1"})
    assert first.returncode != 0
    assert _get(client, s3_bucket, f"commit/{OUT}") is None  # the commit marker is written last
    assert _get(client, s3_bucket, f"commit/{OUT}.summary.json") is not None
    assert _get(client, s3_bucket, f"commit/{OUT}.gallery/index.html") is not None

    started = time.time()
    second = run_msrun(meta, *TINY_ARGS, "--skip_if_existing", log_dir=tmp_path / "log2",
                       env={**fault, "AIRFLOW_CTX_TRY_NUMBER": "2"})
    assert second.returncode == 0, second.tail
    assert not _loaded_model(second)  # every row was journaled: the retry only publishes
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", OUT))
    assert_row_captions(out, rows)
    summary = json.loads(_get(client, s3_bucket, f"commit/{OUT}.summary.json"))
    assert summary["rows"] == len(rows) and summary["captioned"] == len(rows)
    latest = [s for s in summary["ranks"] if s["started_at"] >= started]  # the publisher's, at least
    assert latest and all(s["rows_processed"] == 0 and s["rows_skipped"] == 2 for s in latest)
    for lines in second.rank_logs().values():
        assert any("2 already done, 0 to caption" in line or "output exists, skipping" in line for line in lines)
    index = _get(client, s3_bucket, f"commit/{OUT}.gallery/index.html")
    assert index.count(b"<tr data-row=") == len(rows)

    # A skip that finds summary and gallery gone (say, a crash of an older version) rebuilds them.
    client.delete_object(Bucket=s3_bucket, Key=f"commit/{OUT}.summary.json")
    client.delete_object(Bucket=s3_bucket, Key=f"commit/{OUT}.gallery/index.html")
    skip = _caption_script(s3_server, meta, "--skip_if_existing")
    assert skip.returncode == 0, skip.stdout[-2000:]
    assert "rebuilt summary and gallery" in skip.stdout
    assert json.loads(_get(client, s3_bucket, f"commit/{OUT}.summary.json"))["fingerprint"]["id"] == _fp_id()
    assert _get(client, s3_bucket, f"commit/{OUT}.gallery/index.html").count(b"<tr data-row=") == len(rows)


def _caption_script(s3_server, meta: str, *args: str) -> subprocess.CompletedProcess:
    """The caption script as one plain process (no msrun): enough for a skip, which loads no model."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK_ID", "RANK_SIZE", "MS_ROLE")}
    env.update(s3_server.env())
    argv = [sys.executable, str(REPO / "captioning_core" / "caption_qwen2vl.py"), meta,
            "--pretrained_model_name_or_path", str(TINY_QWEN2VL), *TINY_ARGS, *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


# A 4K, 10-minute clip (1 fps keeps encoding affordable; sampling 1 frame in 20 s keeps decoding so).
UHD_LONG = ClipSpec("blue", "right", "square", 3840, 2160, 1, 600.0, 30)
SPARSE = ["--fps", "0.05"]


def test_prefetch_never_holds_more_than_its_byte_budget(s3_server, s3_bucket, tmp_path_factory, run_msrun,
                                                        tmp_path):
    from captioning_core.models.qwen2_vl import PatchConfig, sample_frames

    clip = ensure_clip(UHD_LONG, tmp_path_factory.mktemp("uhd-long"))
    frames = sample_frames(str(clip), TINY.qwen2vl_options(fps=0.05),
                           PatchConfig.from_model_dir(str(TINY_QWEN2VL)))
    item = frames.nbytes  # the prepared tensor is about this size (float32 patches of these uint8 frames x4)
    budget = 6 * item  # fits one prepared item (~4 x the frames' bytes), not two
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "budget", [(clip, UHD_LONG, "good")] * 4)
    result = run_msrun(meta, *TINY_ARGS, *SPARSE, "--prefetch_batches", "3", "--prefetch_bytes", str(budget),
                       log_dir=tmp_path / "log")
    assert result.returncode == 0, result.tail
    summary = json.loads(_get(client, s3_bucket, f"budget/{OUT}.summary.json"))
    assert len(summary["ranks"]) == 2
    for stat in summary["ranks"]:
        peak = stat["prefetch_peak_bytes"]
        assert 0 < peak <= budget, (peak, budget)
        assert 2 * peak > budget  # one item is more than half the budget: two would not have fitted
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", OUT))
    assert out["caption_status"].tolist() == ["ok"] * 4
