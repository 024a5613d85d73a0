"""Item 7: the same job with 2 msrun workers vs 1 on this machine."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import TINY_ARGS, report, square_clips
from testkit.paths import REPO, TINY_QWEN2VL


def bench_workers(work: Path) -> None:
    from operators.msrun_hook import MsrunHook, MsrunSpec, pick_free_port

    clips = square_clips(work / "clips", 16)
    timings = {}
    for workers in (1, 2):
        meta = work / f"meta_w{workers}.csv"
        meta.write_text("path\n" + "\n".join(str(c) for c in clips) + "\n")
        spec = MsrunSpec(str(REPO / "captioning_core" / "caption_qwen2vl.py"),
                         [str(meta), "--pretrained_model_name_or_path", str(TINY_QWEN2VL), "--bs", "4", *TINY_ARGS],
                         log_dir=str(work / f"log_w{workers}"), worker_num=workers, local_worker_num=workers,
                         master_port=pick_free_port(29500 + workers * 10))
        t = time.perf_counter()
        MsrunHook(spec, line_sink=lambda line: None).run()
        timings[workers] = time.perf_counter() - t
    ratio = timings[1] / timings[2]
    report("7 2 msrun workers vs 1 (16 clips, whole job)", f"{ratio:.2f}x ({timings[2]:.0f}s vs {timings[1]:.0f}s)",
           "report", None)
