"""The journal's cost design (buffered flushes with an explicit crash-loss bound, chunking as a rank goes,
fingerprint filtering), the byte-bounded prefetcher, and a publish PUT retried after a lost response."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from captioning_core import journal, storage
from captioning_core.faults import FaultPlan
from captioning_core.journal import JournalWriter, RowResult
from captioning_core.prefetch import BytePrefetcher, nbytes


def _parts(prefix: Path) -> list[str]:
    return sorted(p.name for p in prefix.iterdir() if p.suffix == ".jsonl") if prefix.exists() else []


def _rows(n: int, fp: str = "f1") -> list[RowResult]:
    return [RowResult(i, f"v{i}.mp4", "ok", f"cap {i}", fingerprint=fp) for i in range(n)]


def test_part_writer_merges_its_parts_into_chunks_as_it_goes(tmp_path):
    prefix = tmp_path / "out.csv.parts"
    writer = journal.PartWriter(str(prefix), rank=0, compact_every=4)
    rows = _rows(10)
    for row in rows:
        writer.write([row])
    names = _parts(prefix)
    assert len([n for n in names if n.endswith(journal.CHUNK_SUFFIX)]) == 2  # rows 0-3 and 4-7
    assert len(names) == 4  # 2 chunks + the 2 parts written since
    assert journal.load(str(prefix), [r.path for r in rows]) == {r.row: r for r in rows}


def test_journal_writer_flushes_by_rows_and_on_close(tmp_path):
    prefix = tmp_path / "p"
    writer = JournalWriter(journal.PartWriter(str(prefix), 0, compact_every=100), FaultPlan(), str(tmp_path / "g"),
                           flush_rows=5, flush_seconds=0)
    for row in _rows(12):
        writer.put([row])
    writer.close()
    assert len(_parts(prefix)) == 3 and writer.rows_written == 12  # 5 + 5 + the last 2 on close


def test_journal_writer_flushes_a_partial_buffer_after_flush_seconds(tmp_path):
    prefix = tmp_path / "p"
    writer = JournalWriter(journal.PartWriter(str(prefix), 0), FaultPlan(), str(tmp_path / "g"),
                           flush_rows=1000, flush_seconds=0.2)
    writer.put(_rows(1))
    deadline = time.monotonic() + 30
    while not _parts(prefix):  # without the time bound nothing would be written before close
        assert time.monotonic() < deadline, "a buffered row was never flushed"
        time.sleep(0.05)
    assert writer.rows_written == 1
    writer.close()
    assert len(_parts(prefix)) == 1


def test_load_ignores_rows_of_other_settings(tmp_path):
    prefix = str(tmp_path / "p")
    paths = ["a.mp4", "b.mp4"]
    journal.PartWriter(prefix, 0).write([RowResult(0, "a.mp4", "ok", "old caption", fingerprint="old"),
                                         RowResult(1, "b.mp4", "ok", "legacy row with no fingerprint")])
    journal.PartWriter(prefix, 1).write([RowResult(0, "a.mp4", "transient", error="x", fingerprint="new")])
    got = journal.load(prefix, paths, "new")
    assert list(got) == [0] and got[0].status == "transient"
    assert journal.load(prefix, paths, "old")[0].text == "old caption"
    assert len(journal.load(prefix, paths)) == 2  # no filter: any settings


def test_byte_prefetcher_keeps_prepared_bytes_within_budget_and_order():
    size = 1000
    done = []

    def prepare(row: int) -> np.ndarray:
        time.sleep(0.005)
        return np.zeros(size // 8 + row % 3, dtype=np.float64)  # 1000-1016 bytes

    fetcher = BytePrefetcher(list(range(40)), prepare, nbytes, budget=3100, max_items=20, workers=4)
    batch = []
    for item, got in fetcher:  # the consumer works in batches of 2, as the runner does with --bs 2
        assert fetcher.held <= 3100
        done.append(item.size - size // 8)
        batch.append(got)
        if len(batch) == 2:
            for held in batch:
                fetcher.release(held)
            batch = []
    fetcher.close()
    assert done == [r % 3 for r in range(40)]
    assert 2000 < fetcher.peak <= 3100  # a batch of 2 was held at once, never more than the budget


def test_byte_prefetcher_still_serves_an_item_larger_than_the_budget():
    fetcher = BytePrefetcher([0, 1], lambda r: np.zeros(100), nbytes, budget=10, max_items=4, workers=2)
    items = []
    for item, got in fetcher:  # the consumer holds both (one batch of 2) before releasing
        items.append((item, got))
    for _, got in items:
        fetcher.release(got)
    fetcher.close()
    assert len(items) == 2 and fetcher.held == 0


def test_nbytes_walks_dataclass_like_items():
    class Item:
        def __init__(self):
            self.pixels = np.zeros((4, 4), dtype=np.float32)
            self.grid = (1, 2, 2)
            self.extra = {"t": [np.zeros(3, dtype=np.uint8)]}

    assert nbytes(Item()) == 64 + 3


@pytest.mark.integration
def test_publish_put_retried_after_a_lost_response_is_recognised_as_ours(s3_server, s3_bucket, monkeypatch,
                                                                         tmp_path):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    storage.s3_client.cache_clear()
    uri = f"s3://{s3_bucket}/p/out.csv"
    body = b"path,text\n" + b"x" * 100_000
    assert storage.put_if_absent(uri, body)
    assert storage.put_if_absent(uri, body)  # the same PUT again: 412, but the object is ours
    assert not storage.put_if_absent(uri, body + b"!")  # someone else's content
    local = str(tmp_path / "out.csv")
    assert storage.put_if_absent(local, body) and storage.put_if_absent(local, body)
    assert not storage.put_if_absent(local, b"other")
    storage.s3_client.cache_clear()


@pytest.mark.integration
def test_a_lost_put_response_inside_the_retry_loop_publishes(s3_server, s3_bucket, monkeypatch):
    """The real failure: the PUT reaches the server, the response is lost (a connection error), the client
    retries, and the retry meets the object it just created."""
    from botocore.exceptions import ConnectionClosedError

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    storage.s3_client.cache_clear()
    client = storage.s3_client()
    real_put = client.put_object
    lost = threading.Event()

    def put_then_lose_response(**kwargs):
        result = real_put(**kwargs)
        if not lost.is_set():
            lost.set()
            raise ConnectionClosedError(endpoint_url=s3_server.endpoint_url)
        return result

    monkeypatch.setattr(client, "put_object", put_then_lose_response)
    assert storage.put_if_absent(f"s3://{s3_bucket}/lost/out.csv", b"body") is True
    assert lost.is_set()
    storage.s3_client.cache_clear()


def test_load_during_a_compaction_sees_every_row(tmp_path):
    """A part deleted between list and read (a publisher compacting) must not hide its rows: they are in
    the merged object, which load finds by listing again."""
    prefix = str(tmp_path / "p")
    rows = _rows(6)
    writer = journal.PartWriter(prefix, 0, compact_every=100)
    for row in rows:
        writer.write([row])
    real_read = storage.read_bytes
    compacted = threading.Event()

    def read_racing_a_compaction(uri: str) -> bytes:
        if not compacted.is_set():
            compacted.set()
            journal.compact(prefix, {r.row: r for r in rows})  # merged object written, every part deleted
        return real_read(uri)

    journal.READ_WORKERS, workers = 1, journal.READ_WORKERS
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(storage, "read_bytes", read_racing_a_compaction)
            got = journal.load(prefix, [r.path for r in rows])
    finally:
        journal.READ_WORKERS = workers
    assert compacted.is_set() and got == {r.row: r for r in rows}
