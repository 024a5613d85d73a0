"""Item 5: a 1,000,000-row partition, shard + merge + write in a fresh interpreter
(``benchmarks.child_million``): its time and its own peak RSS."""

from __future__ import annotations

from pathlib import Path

from benchmarks.children import run_child
from benchmarks.common import report


def bench_million(work: Path) -> None:
    meta = work / "million.csv"
    with open(meta, "w") as fh:
        fh.write("path,num_frames,fps,height,width,aes\n")
        for i in range(1_000_000):
            fh.write(f"s3://bucket/videos/{i:07d}.mp4,120,30,720,1280,{i % 997 / 100:.2f}\n")
    got = run_child("child_million", dict(meta=str(meta), out=str(work / "million_out.csv")))
    report("5 1M rows: shard+merge+write time", f"{got['seconds']:.1f}s", "<= 30 s", got["seconds"] <= 30)
    report("5 1M rows: peak RSS", f"{got['rss_mib']:.0f} MiB", "<= 1024 MiB", got["rss_mib"] <= 1024)
