"""Item 4: resume and publish of a 10,000-row partition on the SeaweedFS server, journaled the way the
runner writes it at --bs 1, vs the one-object-per-row journal it replaced."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import report
from captioning_core.layout import PartitionLayout
from testkit.paths import REPO, TINY_QWEN2VL


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def _journal_like_the_runner(prefix: str, rows: list, ranks: int, flush_rows: int) -> float:
    """Journal ``rows`` as ``ranks`` runner ranks do at --bs 1 (one put per row, the runner's writer thread,
    its flush policy and chunking); returns the seconds it took."""
    from captioning_core import journal
    from captioning_core.faults import FaultPlan
    from captioning_core.journal import JournalWriter

    t = time.perf_counter()
    for rank in range(ranks):
        writer = JournalWriter(journal.PartWriter(prefix, rank), FaultPlan(), PartitionLayout(prefix + "out"), "fp",
                               flush_rows=flush_rows, flush_seconds=30.0)
        for row in rows[rank::ranks]:
            writer.put([row])
        writer.close()
    return time.perf_counter() - t


def bench_resume(work: Path) -> None:
    """Item 4 on the SeaweedFS server: resume (journal load) and publish of a 10,000-row partition journaled
    the way the runner writes it at --bs 1, against the one-object-per-row journal it replaced."""
    from captioning_core import fingerprint, journal, partition_table, storage
    from captioning_core.config import RunConfig
    from captioning_core.journal import RowResult
    from captioning_core.publish import publish
    from testkit.s3server import SeaweedS3

    server = SeaweedS3(data_dir=work / "seaweed")
    server.start()
    try:
        os.environ.update(server.env())
        storage.s3_client.cache_clear()
        bucket = server.create_bucket("bench-resume")
        paths = [f"s3://{bucket}/videos/{i:05d}.mp4" for i in range(10_000)]
        meta = f"s3://{bucket}/day/meta.csv"
        storage.write_bytes(meta, ("path\n" + "\n".join(paths) + "\n").encode())
        cfg = RunConfig(meta_path=meta, model="qwen2vl", pretrained_model_name_or_path=str(TINY_QWEN2VL), device_target="CPU",
                        skip_if_existing=True)
        fp = fingerprint.compute(cfg)
        rows = [RowResult(i, p, "ok", "a red square moves left", tokens=6, fingerprint=fp["id"])
                for i, p in enumerate(paths)]

        # Before: one object per row (what the runner wrote at --bs 1), read one after another.
        old_prefix = PartitionLayout(f"s3://{bucket}/old/out.csv").parts
        old = journal.PartWriter(old_prefix, 0, compact_every=1)
        for row in rows[:2000]:
            old.write([row])
        journal.READ_WORKERS = 1
        serial_2k, _ = _timed(journal.load, old_prefix, paths)
        journal.READ_WORKERS = 16
        parallel_2k, _ = _timed(journal.load, old_prefix, paths)

        for label, flush_rows in (("flush every 64 rows (fast rows)", 64), ("flush every 8 rows (slow rows: "
                                                                            "the 30 s bound hits first)", 8)):
            prefix = cfg.layout.parts if flush_rows == 64 else PartitionLayout(f"s3://{bucket}/slow/out.csv").parts
            written = _journal_like_the_runner(prefix, rows, ranks=2, flush_rows=flush_rows)
            objects = len([u for u in storage.list_prefix(prefix) if u.endswith(".jsonl")])
            load, got = _timed(journal.load, prefix, paths, fp["id"])
            assert len(got) == len(rows)
            report(f"4 resume: load a 10k-row journal written at --bs 1 by 2 ranks, {label}",
                   f"{load:.2f}s ({objects} objects; writing it took {written:.1f}s); the one-object-per-row "
                   f"journal: {serial_2k:.2f}s for 2,000 rows read serially (x5 = ~{5 * serial_2k:.0f}s for 10k), "
                   f"{parallel_2k:.2f}s with parallel reads", "<= 2 s", load <= 2)
        partition = partition_table.read_partition(meta)
        pub, published = _timed(publish, cfg, partition, fp)
        assert published
        report("4 publish of that 10k-row partition (journal load, summary, 100 gallery pages, output, compaction)",
               f"{pub:.2f}s", "<= 2 s", pub <= 2)
        argv = [sys.executable, "-m", "captioning_core.caption_qwen2vl", meta, "--pretrained_model_name_or_path",
                str(TINY_QWEN2VL), "--device_target", "CPU", "--skip_if_existing"]
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        skip = time.perf_counter() - t
        report("4 rerun with --skip_if_existing (process start to exit)", f"{skip:.2f}s", "<= 2 s", skip <= 2)
    finally:
        server.close()
