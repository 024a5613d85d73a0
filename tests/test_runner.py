"""The rank runner on real S3 and real decord, with a small deterministic model in place of a VLM.

``ColourCaptioner`` (testkit/colour_captioner.py) really decodes each clip (the production Qwen2-VL sampling) and
names the shape's colour, so these tests run in seconds and still check that each row gets the caption of its own video. The real
models are exercised under msrun in tests/test_caption_msrun.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from captioning_core import journal
from captioning_core.config import RunConfig
from captioning_core.faults import FaultPlan
from captioning_core.partition_table import PartitionError
from captioning_core.runner import RankRunner
from captioning_core.sharding import RankInfo
from testkit.clips import ensure_clip
from testkit.colour_captioner import ColourCaptioner, colour_config, expected_statuses
from testkit.demo_clips import PARTITION_SPECS
from testkit.outputs import read_output
from testkit.partition import Row, meta_csv, upload_partition

pytestmark = pytest.mark.integration


@pytest.fixture
def clips(tmp_path_factory, broken_clips):
    directory = tmp_path_factory.mktemp("runner-clips")
    good = [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS[:6]]
    return good[:3] + [(broken_clips["garbage"], None, "garbage")] + good[3:] + [
        (broken_clips["zero_byte"], None, "zero_byte")]


def _run(cfg: RunConfig, world: int = 1, faults: FaultPlan | None = None) -> list:
    return [RankRunner(cfg, RankInfo(r, world), ColourCaptioner(cfg), faults or FaultPlan()).run()
            for r in range(world)]


def test_every_row_back_with_its_own_caption(s3_server, s3_bucket, clips):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "p", clips, relative=True)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        from captioning_core import storage

        storage.s3_client.cache_clear()
        cfg = colour_config(meta, bs=2)
        stats = _run(cfg, world=2)
    out = read_output(client, cfg.output)
    assert out["path"].tolist() == [r.path for r in rows]
    assert list(zip(out["caption_status"], out["text"], strict=True)) == expected_statuses(rows)
    errors = dict(zip(out["path"], out["caption_error"], strict=True))
    assert "cannot open video" in errors["videos/garbage.mp4"]
    assert sum(s.rows_processed for s in stats) == len(rows)
    summary = json.loads(client.get_object(Bucket=s3_bucket, Key="p/meta_caption_colour.csv.summary.json")
                         ["Body"].read())
    assert (summary["rows"], summary["captioned"], summary["failed"]) == (8, 6, 2)
    index = client.get_object(Bucket=s3_bucket, Key="p/meta_caption_colour.csv.gallery/index.html")["Body"].read()
    assert index.count(b"<tr data-row=") == 8 and b"cannot open video" in index
    thumbs = client.list_objects_v2(Bucket=s3_bucket, Prefix="p/meta_caption_colour.csv.gallery/thumbs/")
    assert len(thumbs["Contents"]) == 6  # one strip per decodable video


def test_resume_with_another_world_size_recomputes_nothing(s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "p", clips)
    cfg = colour_config(meta)
    # attempt 1: rank 0 of 3 finishes its rows, ranks 1 and 2 never run
    _run_rank = RankRunner(cfg, RankInfo(0, 3), ColourCaptioner(cfg)).run()
    assert _run_rank.rows_processed == 3
    assert not _exists(client, cfg.output)
    # attempt 2 with 2 ranks: rows 0 and 6 are done, and row 3 (garbage) failed for a data reason: final
    stats = _run(cfg, world=2)
    assert sum(s.rows_skipped for s in stats) == 3
    assert sum(s.rows_processed for s in stats) == len(rows) - 3
    assert journal.load(cfg.layout.parts, [r.path for r in rows])[3].attempts == 1
    out = read_output(client, cfg.output)
    assert list(zip(out["caption_status"], out["text"], strict=True)) == expected_statuses(rows)


def test_a_rank_whose_attempt_lost_the_lease_publishes_nothing(s3_server, s3_bucket, clips, s3_env):
    """The publish fence. The lease is stolen while the rank captions: the rank finishes its rows (journaled)
    but writes no output and no summary. The attempt that holds the lease next publishes, captioning nothing."""
    from captioning_core.lease_fence import LeaseLostError
    from operators.lease import S3Lease

    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "p", clips)
    cfg = colour_config(meta)
    lease_key = cfg.output.split("/", 3)[3] + ".lease"
    stale = S3Lease(client, s3_bucket, lease_key, holder="stale", ttl=8)
    stale.acquire(wait=5)
    thief = {"token": "thief", "expires_at": time.time() + 600}
    client.put_object(Bucket=s3_bucket, Key=lease_key, Body=json.dumps(thief).encode())
    with pytest.raises(LeaseLostError, match="held by thief; not publishing"):
        RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg), fence=stale.fence()).run()
    stale.release()
    assert not _exists(client, cfg.output) and not _exists(client, cfg.layout.summary)
    assert all(journal.is_final(res, cfg.max_row_attempts)
               for res in journal.load(cfg.layout.parts, [r.path for r in rows]).values())

    client.delete_object(Bucket=s3_bucket, Key=lease_key)  # the thief is done with it
    holder = S3Lease(client, s3_bucket, lease_key, holder="next", ttl=8)
    holder.acquire(wait=5)
    ColourCaptioner.generate_calls.clear()
    stats = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg), fence=holder.fence()).run()
    holder.release()
    assert (stats.rows_skipped, ColourCaptioner.generate_calls) == (len(rows), [])
    out = read_output(client, cfg.output)
    assert list(zip(out["caption_status"], out["text"], strict=True)) == expected_statuses(rows)


def test_data_failures_are_final_and_not_retried(s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "p", clips)
    cfg = colour_config(meta)
    first = _run(cfg)[0]
    second = _run(cfg)[0]  # no skip_if_existing: nothing is left to do, no model work
    assert (first.rows_processed, first.failed, first.transient) == (8, 2, 0)
    assert (second.rows_processed, second.model_loaded) == (0, False)
    results = journal.load(cfg.layout.parts, [r.path for r in rows])
    assert sorted(r.attempts for r in results.values() if r.status == "failed") == [1, 1]


def test_runtime_fault_holds_the_publish_and_the_next_attempt_redoes_exactly_those_rows(
        s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "p", clips)
    cfg = colour_config(meta, bs=2)
    first = _run(cfg, world=2, faults=FaultPlan(runtime_error=True))
    assert not _exists(client, cfg.output) and all(s.needs_retry for s in first)
    assert sum(s.transient for s in first) == 6 and sum(s.failed for s in first) == 2  # 2 broken files: final
    assert "rows left for the next attempt" in first[0].account()
    ColourCaptioner.generate_calls = []
    second = _run(cfg, world=2)
    assert sum(s.rows_processed for s in second) == 6 and not any(s.needs_retry for s in second)
    out = read_output(client, cfg.output)
    assert list(zip(out["caption_status"], out["text"], strict=True)) == expected_statuses(rows)
    assert set(out["caption_error"][out["caption_status"] == "ok"]) == {""}


def test_a_row_failing_transiently_max_row_attempts_times_is_published_as_failed(
        s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "p", clips[:3])
    cfg = colour_config(meta, max_row_attempts=2)
    assert _run(cfg, faults=FaultPlan(oom_rows={1}))[0].transient == 1
    assert not _exists(client, cfg.output)
    second = _run(cfg, faults=FaultPlan(oom_rows={1}))[0]
    assert (second.rows_processed, second.transient, second.failed) == (1, 0, 1)
    out = read_output(client, cfg.output)
    assert out["caption_status"].tolist() == ["ok", "failed", "ok"]
    assert out.loc[1, "caption_error"].startswith("gave up after 2 attempts: MemoryError")


def test_consecutive_transient_failures_stop_the_rank_early(s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    good = [c for c in clips if c[1] is not None]
    meta, rows = upload_partition(client, s3_bucket, "p", good)
    cfg = colour_config(meta, max_consecutive_errors=2)
    stats = _run(cfg, faults=FaultPlan(runtime_error=True))[0]
    assert stats.rows_processed == 2 and stats.stopped_early.startswith("2 consecutive")
    assert not _exists(client, cfg.output)
    assert len(journal.load(cfg.layout.parts, [r.path for r in rows])) == 2  # the rest were never attempted


def test_duplicate_paths_each_get_a_row(s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    _, rows = upload_partition(client, s3_bucket, "p", clips[:2])
    key = "p/dups.csv"
    client.put_object(Bucket=s3_bucket, Key=key, Body=meta_csv([rows[0], rows[1], rows[0], rows[0]]))
    cfg = colour_config(f"s3://{s3_bucket}/{key}")
    stats = _run(cfg, world=2)
    out = read_output(client, cfg.output)
    assert out["path"].tolist() == [rows[0].path, rows[1].path, rows[0].path, rows[0].path]
    assert set(out["caption_status"]) == {"ok"} and sum(s.rows_processed for s in stats) == 4


def test_empty_partition_publishes_an_empty_output(s3_server, s3_bucket, s3_env):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="e/meta.csv", Body=b"path,aes\n")
    cfg = colour_config(f"s3://{s3_bucket}/e/meta.csv")
    _run(cfg, world=2)
    out = read_output(client, cfg.output)
    assert len(out) == 0 and list(out.columns) == ["path", "aes", "text", "caption_status", "caption_error",
                                                     "video_etag"]


def test_meta_without_path_column_fails_up_front(s3_server, s3_bucket, s3_env):
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="bad/meta.csv", Body=b"video,aes\na.mp4,1\n")
    cfg = colour_config(f"s3://{s3_bucket}/bad/meta.csv")
    with pytest.raises(PartitionError, match="no 'path' column"):
        RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()


def test_missing_objects_and_escapes_fail_per_row(s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    _, rows = upload_partition(client, s3_bucket, "p", clips[:1])
    bad = [Row(f"s3://{s3_bucket}/p/videos/missing.mp4", None), Row("../../etc/passwd", None),
           Row("/etc/hostname", None), Row("videos/with space ünïcode.mp4", None)]
    client.put_object(Bucket=s3_bucket, Key="p/meta2.csv", Body=meta_csv(rows + bad))
    cfg = colour_config(f"s3://{s3_bucket}/p/meta2.csv", allowed_roots=[f"s3://{s3_bucket}/p/"])
    _run(cfg)
    out = read_output(client, cfg.output)
    assert out["caption_status"].tolist() == ["ok", "failed", "failed", "failed", "failed"]
    errors = out["caption_error"].tolist()
    assert "not found" in errors[1] and "'..'" in errors[2] and "outside the allowed roots" in errors[3]
    assert "not found" in errors[4]


def test_missing_local_file_is_not_found(clips, tmp_path):
    """A local path that is not there fails as "video not found", not as a decoder error, and is final."""
    good = clips[0][0]
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv([Row(str(good), clips[0][1]), Row(str(tmp_path / "gone.mp4"), None)]))
    cfg = colour_config(str(meta))
    stats = _run(cfg)[0]
    assert (stats.captioned, stats.failed, stats.transient) == (1, 1, 0)
    out = pd.read_csv(cfg.output, dtype=str, keep_default_na=False)
    assert out["caption_status"].tolist() == ["ok", "failed"]
    assert out.loc[1, "caption_error"] == f"video not found: {tmp_path / 'gone.mp4'}"


def _exists(client, uri: str) -> bool:
    bucket, _, key = uri[5:].partition("/")
    return any(o["Key"] == key for o in client.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", []))


def test_s3_downloads_never_leave_the_local_cache(s3_server, s3_bucket, tmp_path, s3_env):
    """Defence in depth behind the per-row `..` check: whatever an S3 key holds, the download gets a random
    name inside the rank's cache directory, and nothing is written anywhere else."""
    from captioning_core import storage

    client = s3_server.client()
    hostile = ["cache-escape/../../escape.mp4", "cache-escape/a/..%2f..%2fescape.mp4", "cache-escape/.mp4",
               "cache-escape/name with spaces ünï.mp4", "cache-escape/x.mp4/..", "cache-escape/~root.mp4"]
    refused = []
    for key in hostile:
        try:
            client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
        except client.exceptions.ClientError:  # the server refuses some (SeaweedFS: keys with `..` segments)
            refused.append(key)
    stored = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="cache-escape/")["Contents"]]
    assert len(stored) >= 4 and any(".." in k for k in stored), (stored, refused)
    cache = tmp_path / "work" / "cache"
    cache.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    for key in stored:
        local, owned, etag = storage.fetch_to_local(f"s3://{s3_bucket}/{key}", str(cache))
        assert etag == storage.etag_of(client.head_object(Bucket=s3_bucket, Key=key))
        assert owned and Path(local).parent == cache and Path(local).read_bytes() == client.get_object(
            Bucket=s3_bucket, Key=key)["Body"].read()
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p.parent == cache for p in created), created
    assert len(created) == len(stored)


def test_a_local_file_that_cannot_be_read_is_transient_and_only_enoent_is_not_found(clips, tmp_path):
    """Only a path that is not there (ENOENT) is "video not found" (final); a directory is "not a file" (final);
    a file that exists but fails to read (here EIO: /proc/self/mem at offset 0, as a failing disk or a stale
    mount would) is the environment's: transient, retried by the next attempt, and the output waits for it."""
    rows = [Row(str(clips[0][0]), clips[0][1]), Row("/proc/self/mem", None), Row(str(tmp_path), None),
            Row(str(tmp_path / "gone.mp4"), None)]
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv(rows))
    cfg = colour_config(str(meta))
    stats = _run(cfg)[0]
    assert (stats.captioned, stats.failed, stats.transient) == (1, 2, 1)
    assert not os.path.exists(cfg.output)  # a transient row holds the publish
    records = journal.load(cfg.layout.parts, [r.path for r in rows])
    assert records[1].status == "transient" and "Input/output error" in records[1].error
    assert records[2].status == "failed" and records[2].error == f"not a file: {tmp_path}"
    assert records[3].status == "failed" and records[3].error == f"video not found: {tmp_path / 'gone.mp4'}"
