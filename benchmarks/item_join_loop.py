"""Item 10: msrun's join loop, its CPU use with msrun as it is vs the hook's SCHED_IDLE join, measured by
the ``operators.msrun_cpu.CpuSampler`` observer attached to each hook; and the ranks' rows/s."""

from __future__ import annotations

import json
import time
from pathlib import Path

from benchmarks.common import TINY_ARGS, report, square_clips
from captioning_core.layout import PartitionLayout
from testkit.paths import REPO, TINY_QWEN2VL


def bench_join_loop(work: Path, rounds: int = 2) -> None:
    """Issue 14: msrun's join loop polls without sleeping. The same 2-worker job with msrun left as it is and
    with the hook's SCHED_IDLE join, alternately: msrun's own CPU seconds, the ranks' rows/s and job time."""
    from operators.msrun_cpu import CpuSampler
    from operators.msrun_hook import MsrunHook, MsrunSpec, pick_free_port

    clips = square_clips(work / "clips", 16)
    meta = work / "meta.csv"
    meta.write_text("path\n" + "\n".join(str(c) for c in clips) + "\n")
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(rounds):
        for idle in ((False, True) if i % 2 == 0 else (True, False)):
            out = work / f"out_{i}_{idle}.csv"
            spec = MsrunSpec(str(REPO / "captioning_core" / "caption_qwen2vl.py"),
                             [str(meta), "--pretrained_model_name_or_path", str(TINY_QWEN2VL), "--output", str(out),
                              *TINY_ARGS], log_dir=str(work / f"log_{i}_{idle}"), worker_num=2, local_worker_num=2,
                             master_port=pick_free_port(29600 + i * 10), idle_join=idle)
            cpu = CpuSampler()
            hook = MsrunHook(spec, line_sink=lambda line: None, observer=cpu)
            t = time.perf_counter()
            hook.run()
            wall = time.perf_counter() - t
            ranks = json.loads(Path(PartitionLayout(str(out)).summary).read_text())["ranks"]
            runs[idle].append({"wall": wall, "msrun_cpu": cpu.msrun_cpu_seconds, "policy": hook.join_policy,
                               "join_cores": cpu.join_cores or 0.0,
                               "rows_per_second": sum(r["rows_per_second"] for r in ranks),
                               "generate": sum(r["busy_seconds"] for r in ranks) / sum(r["generate_calls"]
                                                                                        for r in ranks)})

    def med(idle: bool, key: str) -> float:
        values = sorted(r[key] for r in runs[idle])
        return values[len(values) // 2]

    ratio = med(True, "rows_per_second") / med(False, "rows_per_second")
    report("10 msrun join loop: CPU it takes, busy (msrun as is) vs SCHED_IDLE join (2 workers, 16 clips)",
           f"join loop used {med(False, 'join_cores'):.2f} cores vs {med(True, 'join_cores'):.2f} "
           f"(msrun in all: {med(False, 'msrun_cpu'):.0f} CPU s in {med(False, 'wall'):.0f} s vs "
           f"{med(True, 'msrun_cpu'):.0f} CPU s in {med(True, 'wall'):.0f} s, "
           f"{runs[True][0]['policy']}); ranks' rows/s {ratio:.2f}x ({med(True, 'rows_per_second'):.2f} vs "
           f"{med(False, 'rows_per_second'):.2f}), generate {med(True, 'generate'):.2f} vs "
           f"{med(False, 'generate'):.2f} s per call; medians of {rounds}", "report", None)
