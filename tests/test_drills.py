"""Reliability drills on the real S3 server: outages, concurrent publishers, no partial outputs."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import pytest

from captioning_core import journal, storage
from captioning_core.faults import FaultPlan
from captioning_core.runner import RankRunner
from captioning_core.sharding import RankInfo
from operators.lease import LeaseHeldError, S3Lease
from testkit.colour_captioner import ColourCaptioner, colour_config, expected_statuses
from testkit.outputs import read_output
from testkit.partition import Row, meta_csv, upload_partition

pytestmark = pytest.mark.integration


@pytest.fixture
def clips(tmp_path_factory, broken_clips):
    from testkit.clips import ensure_clip
    from testkit.demo_clips import PARTITION_SPECS

    directory = tmp_path_factory.mktemp("drill-clips")
    return [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS[:6]]


def _run_in_thread(cfg, faults):
    box = {}

    def target():
        try:
            box["stats"] = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg), faults).run()
        except Exception as err:  # surfaced to the test
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _wait_mid_partition(cfg, thread, box) -> None:
    """Until the rank has journaled a part (past model load, mid-partition); fail if it ended first."""
    deadline = time.monotonic() + 120
    while not [u for u in storage.list_prefix(cfg.layout.parts) if u.endswith(".jsonl")]:
        assert thread.is_alive() and time.monotonic() < deadline, box
        time.sleep(0.1)


class _RetryWatch(logging.Handler):
    """Sets ``seen`` once captioning_core.storage logs a retry (an S3 call failed and will be tried again)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying in" in record.getMessage():
            self.seen.set()


@contextlib.contextmanager
def _outage_until_a_retry(s3_server, within: float, what: str):
    """S3 is down from entry until, after the block, an S3 call is seen failing and retrying (the outage is
    held until it hits a call, never a wall-clock guess); then the server is started again."""
    retries = _RetryWatch()
    logger = logging.getLogger(storage.__name__)
    logger.addHandler(retries)
    s3_server.stop()
    try:
        yield
        assert retries.seen.wait(within), what
    finally:
        s3_server.start()
        logger.removeHandler(retries)


def test_short_s3_outage_is_ridden_out(s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "p", clips)
    s3_env.setenv("CAPTION_S3_RETRY_SECONDS", "120")
    storage.s3_client.cache_clear()
    cfg = colour_config(meta)
    thread, box = _run_in_thread(cfg, FaultPlan(sleep_per_batch=0.7))
    _wait_mid_partition(cfg, thread, box)
    with _outage_until_a_retry(s3_server, 90, "no S3 call failed during the outage"):
        pass
    thread.join(timeout=180)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert box["stats"].transient == 0, box["stats"]
    out = read_output(s3_server.client(), cfg.output)
    assert list(zip(out["caption_status"], out["text"], strict=True)) == expected_statuses(rows)


def test_a_video_fetch_during_an_outage_waits_for_s3_to_return(s3_server, s3_bucket, s3_env, tmp_path):
    """Video downloads retry like every other S3 call (within CAPTION_S3_RETRY_SECONDS): a fetch begun while
    the server is down completes once it is back, instead of making its row transient."""
    client = s3_server.client()
    body = b"not a video, just bytes" * 1000
    client.put_object(Bucket=s3_bucket, Key="outage/clip.mp4", Body=body)
    s3_env.setenv("CAPTION_S3_RETRY_SECONDS", "120")
    storage.s3_client.cache_clear()
    box = {}
    fetch = threading.Thread(target=lambda: box.update(
        got=storage.fetch_to_local(f"s3://{s3_bucket}/outage/clip.mp4", str(tmp_path))))
    with _outage_until_a_retry(s3_server, 60, "the fetch did not retry"):
        fetch.start()
    fetch.join(timeout=120)
    assert not fetch.is_alive() and "got" in box, box
    local, owned, _ = box["got"]
    assert owned and open(local, "rb").read() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == [os.path.basename(local)]  # no partial leftovers


def test_long_outage_fails_the_attempt_cleanly_and_the_next_resumes(s3_server, s3_bucket, clips, s3_env):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "p", clips)
    s3_env.setenv("CAPTION_S3_RETRY_SECONDS", "2")
    s3_env.setenv("CAPTION_S3_CONNECT_TIMEOUT", "1")
    storage.s3_client.cache_clear()
    cfg = colour_config(meta)
    thread, box = _run_in_thread(cfg, FaultPlan(sleep_per_batch=0.7))
    _wait_mid_partition(cfg, thread, box)
    s3_server.stop()
    thread.join(timeout=180)
    s3_server.start()
    assert isinstance(box.get("error"), Exception)  # the attempt failed instead of hanging
    client = s3_server.client()
    done = len([o for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="p/meta_caption_colour.csv.parts/")
                .get("Contents", []) if o["Key"].endswith(".jsonl")])
    assert 0 < done < len(rows)
    stats = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()
    assert stats.rows_skipped == done and stats.rows_processed == len(rows) - done
    out = read_output(client, cfg.output)
    assert list(zip(out["caption_status"], out["text"], strict=True)) == expected_statuses(rows)


@pytest.mark.parametrize("where", ["preflight", "mid_run"])
def test_an_outage_uses_no_row_attempts(s3_server, s3_bucket, clips, s3_env, tmp_path, where):
    """Issue 25 #3. S3 is down through three attempts (``max_row_attempts`` of them, as three Airflow tries
    inside one outage would be). The meta and the journal are local, so the outage hits only the videos.
    ``preflight``: every video is on S3, so each attempt stops in its check before the model loads.
    ``mid_run``: row 0 is a local clip, so the check passes, the model loads, row 0 is captioned, and the
    outage meets the first S3 fetch. Either way no row's attempts are used: once S3 is back, the next attempt
    captions every video (before: each was published "gave up after 3 attempts: EndpointConnectionError")."""
    _, on_s3 = upload_partition(s3_server.client(), s3_bucket, "outage", clips[1:5])
    rows = ([Row(str(clips[0][0]), clips[0][1])] if where == "mid_run" else []) + on_s3
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv(rows))
    s3_env.setenv("CAPTION_S3_RETRY_SECONDS", "1")
    s3_env.setenv("CAPTION_S3_CONNECT_TIMEOUT", "1")
    storage.s3_client.cache_clear()
    cfg = colour_config(str(meta), max_row_attempts=3)
    s3_server.stop()
    try:
        for attempt in range(cfg.max_row_attempts):  # mid_run: later attempts stop in the check (row 0 is done)
            stats = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()
            assert "an outage, no row attempt counted" in stats.stopped_early, stats
            assert stats.model_loaded == stats.captioned == (where == "mid_run" and attempt == 0)
            assert stats.needs_retry
    finally:
        s3_server.start()
    assert not os.path.exists(cfg.output)
    done = journal.load(cfg.layout.parts, [r.path for r in rows])
    assert sorted(done) == ([0] if where == "mid_run" else [])  # no S3 row has a journaled attempt
    stats = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()
    assert (stats.captioned, stats.failed, stats.transient) == (len(on_s3), 0, 0), stats
    out = read_output(s3_server.client(), cfg.output)
    assert list(zip(out["caption_status"], out["text"], strict=True)) == expected_statuses(rows)


def test_the_store_answering_is_told_from_an_outage(s3_server, s3_bucket, s3_env, tmp_path):
    """What decides whether a failed read was the row's attempt: any S3 answer with valid credentials (a
    missing key, a missing bucket) is a working store; a wrong secret or a stopped server is not."""
    s3_env.setenv("CAPTION_S3_CONNECT_TIMEOUT", "1")
    storage.s3_client.cache_clear()
    assert storage.service_answers(f"s3://{s3_bucket}/no/such/key.mp4")
    assert storage.service_answers("s3://no-such-bucket-here/key.mp4")
    assert storage.service_answers(str(tmp_path / "missing.mp4"))
    assert storage.service_answers(str(tmp_path / "no" / "such" / "dir" / "x.mp4"))
    s3_env.setenv("AWS_SECRET_ACCESS_KEY", "a-wrong-secret")
    storage.s3_client.cache_clear()
    assert not storage.service_answers(f"s3://{s3_bucket}/no/such/key.mp4")
    s3_env.setenv("AWS_SECRET_ACCESS_KEY", s3_server.env()["AWS_SECRET_ACCESS_KEY"])
    storage.s3_client.cache_clear()
    s3_server.stop()
    try:
        assert not storage.service_answers(f"s3://{s3_bucket}/no/such/key.mp4")
    finally:
        s3_server.start()
        storage.s3_client.cache_clear()


def test_concurrent_publishers_produce_one_consistent_output(s3_server, s3_bucket, s3_env):
    """Many ranks publishing the same partition at once: one conditional PUT wins, readers never see a
    partial object, and the object is one of the complete bodies."""
    uri = f"s3://{s3_bucket}/race/out.csv"
    bodies = [(f"header\n{i}\n" + "x" * 200_000).encode() for i in range(6)]
    results, seen, stop = [], set(), threading.Event()

    def reader():
        c = s3_server.client()
        while not stop.is_set():
            try:
                seen.add(c.get_object(Bucket=s3_bucket, Key="race/out.csv")["Body"].read())
            except Exception:  # not there yet
                pass

    watcher = threading.Thread(target=reader)
    watcher.start()
    threads = [threading.Thread(target=lambda b=b: results.append(storage.put_if_absent(uri, b))) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(0.3)
    stop.set()
    watcher.join()
    assert results.count(True) == 1
    final = storage.read_bytes(uri)
    assert final in bodies and seen <= set(bodies) and seen


def test_lease_admits_one_attempt_and_expired_leases_are_taken_over(s3_server, s3_bucket):
    client = s3_server.client()
    first = S3Lease(client, s3_bucket, "p/out.csv.lease", holder="try1", ttl=2, poll=0.2)
    second = S3Lease(client, s3_bucket, "p/out.csv.lease", holder="try2", ttl=2, poll=0.2)
    first.acquire(wait=1)
    with pytest.raises(LeaseHeldError, match="try1"):
        second.acquire(wait=1)  # the holder renews every ttl/3, so it never expires
    first._stop.set()  # the holder dies without releasing: heartbeats stop
    first._thread.join()
    second.acquire(wait=10)  # taken over once expired
    assert not first.try_acquire()
    second.release()
    assert first.try_acquire()
