"""Item 11 (opt-in): released layouts at real size; the layouts are in ``benchmarks.realsize``, the build
and load run in ``benchmarks.child_realsize_build`` / ``child_realsize_load``, the load watched for memory."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.children import run_child, run_child_watched
from benchmarks.common import report


def bench_realsize(work: Path, *, realsize: str = "qwen2vl-2b", dtypes: str = "bfloat16,float16,float32") -> None:
    """Item 11: released layouts at real size (see benchmarks/realsize.py). Each model's checkpoint is built by
    real PyTorch, then loaded once per dtype in a fresh mindnlp process, which is stopped once its RSS passes 3x
    the checkpoint's bytes (the 1.5x target is missed by then) or the machine has under 3 GiB left (it is
    shared); a load that could not fit from the start is not tried."""
    from benchmarks.realsize import MODELS, mem_available_gib
    from testkit.clips import ClipSpec, ensure_clip

    clip = ensure_clip(ClipSpec(), work / "clips")  # 2 s 320x240: 4 frames at --fps 2 in a 112x112 budget
    for key in [k for k in realsize.split(",") if k]:
        layout, out = MODELS[key], work / key
        need = 1.2 * layout.released_gb * 1e9 / 2**30 + 2  # the builder holds the bf16 model once, plus buffers
        if mem_available_gib() < need:
            report(f"11 {layout.repo_id}: build", f"not run: ~{need:.0f} GiB needed, "
                   f"{mem_available_gib():.1f} GiB available now (machine shared)", "report", None)
            continue
        ck = run_child("child_realsize_build", dict(key=key, out=str(out)))
        gib = ck["weights_bytes"] / 2**30
        report(f"11 {layout.repo_id}: random-weight checkpoint", f"{ck['params'] / 1e9:.2f} B params, "
               f"{len(ck['shard_bytes'])} bf16 shards {' + '.join(f'{b / 1e9:.2f}' for b in ck['shard_bytes'])} GB "
               f"+ index = {gib:.2f} GiB; built in {ck['build_s']:.0f}s, saved in {ck['save_s']:.0f}s "
               f"(builder peak RSS {ck['hwm_gib']:.1f} GiB)", "report", None)
        for dtype in [d for d in dtypes.split(",") if d]:
            weights = gib * (2 if dtype == "float32" else 1)  # the weights as the model holds them
            label, target = f"11 {layout.repo_id} {dtype}", "peak RSS <= 1.5x weights"
            if mem_available_gib() < 1.3 * weights + 4:
                report(label, f"not run: loading {weights:.1f} GiB of {dtype} weights needs ~{1.3 * weights + 4:.0f}"
                       f" GiB free, {mem_available_gib():.1f} GiB available now (machine shared)", target, None)
                continue
            # stopped past 3x the checkpoint's bytes: the 1.5x target is missed by then at any dtype
            got = run_child_watched("child_realsize_load",
                                    dict(name=layout.captioner, dtype=dtype, model_dir=str(out),
                                         meta=str(work / "unused.csv"), clip=str(clip)), cap_gib=3 * gib)
            if "stopped_at_gib" in got:
                phase = got["phase"]
                done = f"load (setup) {got['load_s']:.1f}s, peak after load {got['after_load']['VmHWM']:.2f} GiB; " \
                    if "load_s" in got else ""
                report(label, f"{done}STOPPED while {phase} at {got['stopped_at_gib']:.1f} GiB RSS "
                       f"({got['stopped_at_gib'] / weights:.2f}x the {weights:.2f} GiB of {dtype} weights; stop rule: RSS > 3x "
                       f"the {gib:.2f} GiB checkpoint, or < 3 GiB left on the machine)", target, False)
                continue
            if "load_failed" in got:
                report(label, f"load FAILED: {got['load_failed']['error']} at {got['load_failed']['where']}",
                       "loads", False)
                continue
            peak, at_load = got["end"]["VmHWM"], got["after_load"]["VmHWM"]
            report(label, f"load (setup) {got['load_s']:.1f}s after a {got['import_s']:.1f}s mindnlp import; peak RSS "
                   f"after load {at_load:.2f} GiB = {at_load / weights:.2f}x, whole run {peak:.2f} GiB = "
                   f"{peak / weights:.2f}x the {weights:.2f} GiB of {dtype} weights ({gib:.2f} GiB on disk)",
                   target, peak / weights <= 1.5)
            if "generate_s" in got:
                report(f"{label}: generate", f"{got['generate_s']:.1f}s for 8 new tokens ({got['new_tokens']} before "
                       f"a stop id; {got['video_tokens']} video tokens)", "runs", True)
            else:
                report(f"{label}: generate", f"FAILED: {got['generate_failed']['error']} at "
                       f"{got['generate_failed']['where']}", "runs", False)
        shutil.rmtree(out, ignore_errors=True)
