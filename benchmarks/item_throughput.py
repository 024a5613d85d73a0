"""Items 1 and 2: the runner (prefetch + batching) vs the seed's loop on the same clips, each side in a
fresh interpreter (``benchmarks.child_throughput``); and the model-busy fraction, also where decoding a
video costs about what one generate call does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks.children import run_child
from benchmarks.common import TINY_ARGS, report, square_clips, textured_clip, tiny_args
from testkit.paths import TINY_QWEN2VL
from testkit.profile import TINY


def bench_throughput(work: Path) -> None:
    clips = square_clips(work / "clips", 16)
    meta = work / "meta.csv"
    meta.write_text("path\n" + "\n".join(str(c) for c in clips) + "\n")
    common = dict(meta=str(meta), model=str(TINY_QWEN2VL), extra=TINY_ARGS)
    seed = run_child("child_throughput", dict(mode="seed", bs="1", out=str(work / "seed.csv"), **common))
    ours = run_child("child_throughput", dict(mode="runner", bs="4", out=str(work / "ours.csv"), **common))
    ratio = (ours["rows"] / ours["wall"]) / (seed["rows"] / seed["wall"])
    report("1 throughput vs seed loop", f"{ratio:.2f}x ({ours['rows'] / ours['wall']:.2f} vs "
           f"{seed['rows'] / seed['wall']:.2f} rows/s)", ">= 1.5x", ratio >= 1.5)
    report("2 model-busy fraction (tiny profile: 2 s clips, decode ~0.05 s)",
           f"{100 * ours['busy']:.0f}% (seed loop {100 * seed['busy']:.0f}%)", ">= 90%", ours["busy"] >= 0.9)
    bench_decode_heavy(work)


def bench_decode_heavy(work: Path, rows: int = 24) -> None:
    """Item 2 where decoding costs about what generate does: 60 s camera-like 640x360 clips with a 250-frame
    GOP, 6 frames sampled (--fps 0.1) at 112x112, so the token count (and generate) stays small."""
    clip = textured_clip(work / "heavy", seconds=60.0, gop=250)
    meta = work / "heavy.csv"
    meta.write_text("path\n" + "\n".join([str(clip)] * rows) + "\n")
    extra = tiny_args(dataclasses.replace(TINY, fps=0.1))
    common = dict(meta=str(meta), model=str(TINY_QWEN2VL), extra=extra)
    seed = run_child("child_throughput", dict(mode="seed", bs="1", out=str(work / "heavy_seed.csv"), **common))
    ours = run_child("child_throughput", dict(mode="runner", bs="4", out=str(work / "heavy_ours.csv"), **common))
    ratio = (ours["rows"] / ours["wall"]) / (seed["rows"] / seed["wall"])
    seed_decode, seed_gen = seed["decode"] / seed["rows"], seed["busy"] * seed["wall"] / seed["calls"]
    report("2 model-busy fraction, decode-heavy (60 s textured GOP-250 clips, 6 frames each)",
           f"runner {100 * ours['busy']:.0f}% vs seed loop {100 * seed['busy']:.0f}%; throughput "
           f"{ratio:.2f}x ({ours['rows'] / ours['wall']:.2f} vs {seed['rows'] / seed['wall']:.2f} rows/s); "
           f"seed loop: decode {seed_decode:.2f}s per video, generate {seed_gen:.2f}s per call (bs 1); runner: "
           f"decode {ours['decode'] / ours['rows']:.2f}s per video in 2 threads, generate "
           f"{ours['generate'] / ours['calls']:.2f}s per call (bs 4), waited {ours['wait']:.1f}s for decoded "
           f"videos (the first batches decode during the {ours['load']:.1f}s model import+load)", ">= 90%",
           ours["busy"] >= 0.9)
