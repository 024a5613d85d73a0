"""The fixed clips that tests and the demo caption. The tiny models never train on these (held out)."""

from __future__ import annotations

from testkit.clips import ClipSpec

# A varied partition: sizes from 240p to 720p, portrait and landscape, 24-30 fps, GOP 1 to 250.
PARTITION_SPECS = (
    ClipSpec("red", "left", "square", 320, 240, 25, 2.0, 12),
    ClipSpec("green", "right", "circle", 640, 360, 30, 1.0, 1),
    ClipSpec("blue", "up", "square", 426, 240, 24, 3.0, 250),
    ClipSpec("yellow", "down", "circle", 352, 288, 25, 2.0, 12),
    ClipSpec("red", "right", "circle", 400, 300, 30, 1.5, 30),
    ClipSpec("green", "up", "square", 320, 240, 24, 2.0, 12),
    ClipSpec("blue", "down", "circle", 640, 360, 25, 1.0, 12),
    ClipSpec("yellow", "left", "square", 240, 320, 30, 2.5, 60),
    ClipSpec("red", "down", "square", 1280, 720, 30, 1.0, 12),
    ClipSpec("green", "left", "circle", 352, 288, 24, 4.0, 12),
)
# What lands in the DAG's incoming prefix in the end-to-end test and the demo (one of them rotated).
DAG_SPECS = (
    ClipSpec("red", "left", "square", 320, 240, 25, 2.0, 12),
    ClipSpec("green", "up", "circle", 352, 288, 25, 2.0, 12),
    ClipSpec("blue", "right", "square", 400, 300, 30, 1.5, 30),
    ClipSpec("yellow", "down", "circle", 320, 240, 24, 3.0, 12),
    ClipSpec("red", "up", "circle", 426, 240, 24, 2.0, 12),
    # a phone's portrait clip: stored 640x360, shown 360x640 through a 90-degree display matrix
    ClipSpec("blue", "left", "circle", 360, 640, 25, 2.0, 12, rotation=90),
)
SMALL_SPECS = tuple(ClipSpec(c, "left") for c in ("red", "green", "blue", "yellow"))

DEMO_SPECS = tuple(dict.fromkeys(PARTITION_SPECS + DAG_SPECS + SMALL_SPECS))

# The token-batching partition (tests/test_batching.py, benchmark 9): 64 clips of 2 to 20 s, durations
# interleaved so neighbouring rows differ in length (32 to 320 video tokens at the tiny profile: 112x112, 2 fps).
MIXED_DURATION_SPECS = tuple(
    ClipSpec(("red", "green", "blue", "yellow")[i % 4], ("left", "right", "up", "down")[(i // 4) % 4],
             ("square", "circle")[(i // 16) % 2], 320, 240, 25, float(2 + (i * 7) % 19), 25)
    for i in range(64))
