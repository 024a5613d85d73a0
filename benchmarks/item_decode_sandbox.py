"""Item 14: what decoding in decoder processes (captioning_core.decode_sandbox, issue 25 #2) costs against
decoding in the rank itself, on the same clips and frame indices."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import report, square_clips, textured_clip


def bench_decode_sandbox(work: Path, reps: int = 5) -> None:
    """Wall seconds of ``read_frames`` with and without a DecodeSandbox, interleaved, best of ``reps``.

    Wall, not CPU: the decoder process's CPU is not this process's. The sandbox's children are started
    before timing (the rank starts them while the model loads), so this is the per-video price: the request,
    the decoder's own open of the file, and the frames' trip through the pipe.
    """
    from captioning_core import video
    from captioning_core.decode_sandbox import DecodeSandbox

    groups = {"60 s textured 640x360, 2 fps (120 frames)": [str(textured_clip(work))],
              "8 short 2 s clips, 2 fps": [str(p) for p in square_clips(work, 8)]}
    plans = {}
    for paths in groups.values():
        for path in paths:
            opened = video.open_video(path)
            plans[path] = video.qwen_sample_indices(opened, 2.0)
    sandbox = DecodeSandbox(timeout=600)
    try:
        sandbox.read_frames(groups["8 short 2 s clips, 2 fps"][0], [0])  # start the child, untimed

        def here(paths: list[str]) -> int:
            return sum(video.read_frames_here(video.open_video(p), plans[p]).nbytes for p in paths)

        def there(paths: list[str]) -> int:
            return sum(sandbox.read_frames(p, plans[p]).nbytes for p in paths)

        best: dict[tuple[str, str], float] = {}
        moved: dict[str, int] = {}
        sides = [("in the rank", here), ("decoder process", there)]
        for rep in range(reps):
            for group, paths in groups.items():
                for side, fn in sides[::-1] if rep % 2 else sides:  # alternate who goes first
                    started = time.perf_counter()
                    moved[group] = fn(paths)
                    spent = time.perf_counter() - started
                    best[(group, side)] = min(best.get((group, side), float("inf")), spent)
    finally:
        sandbox.close()
    for group in groups:
        a, b = best[(group, "in the rank")], best[(group, "decoder process")]
        report(f"decoder process vs in the rank, {group}",
               f"{b:.3f} s vs {a:.3f} s = {b / a:.2f}x ({moved[group] / 2**20:.0f} MiB of frames)",
               "<= 1.15x", b / a <= 1.15)
