"""Qwen2-VL captioning of a real partition on SeaweedFS under real msrun with 2 CPU workers."""

from __future__ import annotations

import json
import time

import pytest

from testkit.outputs import assert_row_captions, read_csv_from_s3
from testkit.partition import MIXED_BROKEN, upload_partition
from testkit.paths import TINY_MODELS
from testkit.process import wait_for
from testkit.profile import TINY_ARGS

pytestmark = [pytest.mark.integration, pytest.mark.msrun]

# The tiny Qwen3-VL's own video_preprocessor_config.json holds its small pixel budget: no size options.
QWEN3_ARGS = ["--device_target", "CPU", "--max_new_tokens", "12", "--log_every", "0"]
TINY_QWEN3VL = TINY_MODELS / "qwen3vl"


@pytest.mark.parametrize("model", ["qwen2vl", "qwen3vl"])
def test_partition_on_s3_under_msrun(model, s3_server, s3_bucket, partition_clips, run_msrun, tmp_path):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "day=2026-11-22/part-0", partition_clips)
    assert len(rows) >= 12
    extra = {} if model == "qwen2vl" else {"model_dir": TINY_QWEN3VL, "script": "caption.py", "model": model}
    args = TINY_ARGS if model == "qwen2vl" else QWEN3_ARGS
    result = run_msrun(meta, *args, "--bs", "2", log_dir=tmp_path / "log", **extra)
    assert result.returncode == 0, result.tail
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", f"meta_caption_{model}.csv"))
    assert out["path"].tolist() == [r.path for r in rows]
    assert out["aes"].tolist() == [f"{i / 7:.6f}" for i in range(len(rows))]  # pass-through untouched
    for row, (_, got) in zip(rows, out.iterrows(), strict=True):
        if row.spec is not None:
            assert (got["caption_status"], got["text"]) == ("ok", row.expected_caption), row
            assert got["caption_error"] == ""
        else:
            assert got["caption_status"] == "failed", row
            assert got["text"] == ""
            assert got["caption_error"], row
    summary = json.loads(
        client.get_object(
            Bucket=s3_bucket, Key=f"day=2026-11-22/part-0/meta_caption_{model}.csv.summary.json"
        )["Body"].read()
    )
    assert summary["rows"] == len(rows) and summary["failed"] == len(MIXED_BROKEN)
    assert {s["rank"] for s in summary["ranks"]} == {0, 1}
    logs = result.rank_logs()
    assert any("progress rank 0/2" in line and "ETA" in line for line in logs[0])
    assert any("progress rank 1/2" in line for line in logs[1])

    # A rerun with --skip_if_existing loads no model and returns in seconds.
    started = time.monotonic()
    again = run_msrun(meta, *args, "--skip_if_existing", log_dir=tmp_path / "log2", **extra)
    elapsed = time.monotonic() - started
    assert again.returncode == 0, again.tail
    for lines in again.rank_logs().values():
        assert any("output exists, skipping" in line for line in lines)
        assert not any("loaded " in line for line in lines)
    assert elapsed < 20, elapsed


def test_sigkilled_rank_resumes_without_loss_or_recompute(
    s3_server, s3_bucket, partition_clips, run_msrun, tmp_path
):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "part-kill", partition_clips[:8])
    parts_prefix = "part-kill/meta_caption_qwen2vl.csv.parts/"
    first = run_msrun(meta, *TINY_ARGS, "--journal_flush_rows", "1", log_dir=tmp_path / "log1",
                      env={"CAPTION_FAULTS": "sigkill@1:2"})  # flush each row: the kill lands mid-partition
    assert first.returncode != 0
    _wait_for_ranks_to_exit(meta)  # a surviving rank ends its batch and journals it after msrun has returned
    assert not _exists(client, s3_bucket, "part-kill/meta_caption_qwen2vl.csv")
    done_before = _journaled_rows(client, s3_bucket, parts_prefix)
    assert done_before  # rows finished before the kill are in the journal

    second_started = time.time()
    second = run_msrun(meta, *TINY_ARGS, log_dir=tmp_path / "log2")
    assert second.returncode == 0, second.tail
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", "meta_caption_qwen2vl.csv"))
    assert out["path"].tolist() == [r.path for r in rows]  # nothing lost, nothing duplicated
    assert_row_captions(out, rows)
    summary = json.loads(
        client.get_object(Bucket=s3_bucket, Key="part-kill/meta_caption_qwen2vl.csv.summary.json")[
            "Body"
        ].read()
    )
    # stats from the second attempt: it skipped exactly the rows journaled before and processed the rest
    second_attempt = [s for s in summary["ranks"] if s["started_at"] >= second_started]
    assert len(second_attempt) == 2
    assert sum(s["rows_skipped"] for s in second_attempt) == len(done_before)
    assert sum(s["rows_processed"] for s in second_attempt) == len(rows) - len(done_before)


def _wait_for_ranks_to_exit(meta: str, timeout: float = 120) -> None:
    """Until no process of this machine still runs a caption script on ``meta`` (msrun's survivors included)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for proc in psutil.process_iter(["cmdline"]):
            if meta in (proc.info["cmdline"] or []):
                alive.append(proc.pid)
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"caption ranks on {meta} still running after {timeout}s: {alive}")


def _exists(client, bucket: str, key: str) -> bool:
    return client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0 and any(
        o["Key"] == key for o in client.list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]
    )


def _journaled_rows(client, bucket: str, prefix: str) -> set[int]:
    """Rows journaled final: captioned, or failed on bad data (transient rows are retried, so they don't count)."""
    rows = set()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
        if obj["Key"].endswith(".jsonl"):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
            records = [json.loads(line) for line in body.splitlines() if line.strip()]
            rows.update(r["row"] for r in records if r["status"] in ("ok", "failed"))
    return rows


def test_seed_allgather_path(s3_server, s3_bucket, partition_clips, run_msrun, tmp_path):
    """--gather allgather: token ids AllGathered over msrun's group, rank 0 decodes and publishes."""
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "part-ag", partition_clips[:6])
    result = run_msrun(meta, *TINY_ARGS, "--gather", "allgather", "--pad_length", "64", log_dir=tmp_path / "log")
    assert result.returncode == 0, result.tail
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", "meta_caption_qwen2vl.csv"))
    assert_row_captions(out, rows)
    logs = result.rank_logs()
    assert any("published" in line for line in logs[0])
    assert not any("published" in line for line in logs[1])


def test_oom_on_one_rank_with_allgather_fails_only_that_row(
    s3_server, s3_bucket, partition_clips, run_msrun, tmp_path
):
    """Drill 7 under msrun: rank 1's batch (rows 1, 3) runs out of memory; both rows are retried singly,
    row 3 keeps failing and, with one attempt allowed, is recorded as failed; rank 0 finishes; the AllGather
    still completes and the partition publishes."""
    client = s3_server.client()
    good = [clip for clip in partition_clips if clip[1] is not None][:6]
    meta, rows = upload_partition(client, s3_bucket, "part-oom", good)
    result = run_msrun(meta, *TINY_ARGS, "--bs", "2", "--gather", "allgather", "--pad_length", "64",
                       "--max_row_attempts", "1", log_dir=tmp_path / "log", env={"CAPTION_FAULTS": "oom@1:3"})
    assert result.returncode == 0, result.tail
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", "meta_caption_qwen2vl.csv"))
    assert out["path"].tolist() == [r.path for r in rows]
    for i, (row, (_, got)) in enumerate(zip(rows, out.iterrows(), strict=True)):
        if i == 3:
            assert (got["caption_status"], got["text"]) == ("failed", "")
            assert got["caption_error"].startswith("gave up after 1 attempts: MemoryError: injected out-of-memory")
        else:
            assert (got["caption_status"], got["text"]) == ("ok", row.expected_caption), row
    rank1 = result.rank_logs()[1]
    assert any("batch of 2 failed (out of memory); retrying one row at a time" in line for line in rank1)
    assert any("published" in line for line in result.rank_logs()[0])


def test_s3_outage_mid_run_under_msrun_is_ridden_out(s3_server, s3_bucket, partition_clips, run_msrun, tmp_path):
    """Drill 3 with the real stage: S3 stops while both ranks are captioning, until a rank's call is seen
    failing; every read and write in flight retries, and the partition completes with every row right."""
    import threading

    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "part-outage", partition_clips[:8])
    parts = "part-outage/meta_caption_qwen2vl.csv.parts/"
    box = {}
    runner = threading.Thread(target=lambda: box.update(result=run_msrun(
        meta, *TINY_ARGS, log_dir=tmp_path / "log", env={"CAPTION_FAULTS": "slow@0:1,slow@1:1"})))
    runner.start()
    deadline = time.monotonic() + 300
    while not _journaled_rows(client, s3_bucket, parts):  # both ranks past model load, mid-partition
        assert runner.is_alive() and time.monotonic() < deadline, box
        time.sleep(0.3)
    s3_server.stop()
    try:  # the outage lasts until an S3 call of a rank is seen failing (never a wall-clock guess), then ends
        wait_for(lambda: any("retrying in" in log.read_text(errors="replace")
                             for log in (tmp_path / "log").glob("worker_*.log")), 90, "a rank's S3 call to fail")
    finally:
        s3_server.start()
    runner.join(timeout=600)
    result = box["result"]
    assert result.returncode == 0, result.tail
    retried = [line for lines in result.rank_logs().values() for line in lines if "failed" in line and
               "retrying in" in line]
    assert retried, "the outage never hit an S3 call"
    client = s3_server.client()
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", "meta_caption_qwen2vl.csv"))
    assert out["path"].tolist() == [r.path for r in rows]
    assert_row_captions(out, rows)
