"""What every benchmark item shares: the tiny profile's argv, the result table, and the synthetic clips."""

from __future__ import annotations

import subprocess
from pathlib import Path

from testkit.profile import TINY, Profile


def tiny_args(profile: Profile = TINY) -> list[str]:
    """The caption scripts' CPU argv for the benchmarks: ``profile`` (the tiny one), 8-token captions, quiet."""
    return ["--device_target", "CPU", *profile.args(), "--max_new_tokens", "8", "--log_every", "1000"]


TINY_ARGS = tiny_args()
RESULTS: list[tuple[str, str, str, str]] = []


def report(item: str, measured: str, target: str, met: bool | None) -> None:
    """Print one result line now and keep it for the table ``run.main`` prints at the end."""
    verdict = "n/a" if met is None else ("met" if met else "MISSED")
    RESULTS.append((item, measured, target, verdict))
    print(f"  {item}: {measured} (target {target}: {verdict})", flush=True)  # noqa: T201


def square_clips(directory: Path, n: int, seconds: float = 2.0) -> list[Path]:
    """``n`` of the testkit's moving-square clips (640x360, 30 fps, ``seconds`` long), made once."""
    from testkit.clips import COLORS, DIRECTIONS, ClipSpec, ensure_clip

    specs = [ClipSpec(c, d, "square", 640, 360, 30, seconds, 30) for c in COLORS for d in DIRECTIONS][:n]
    return [ensure_clip(s, directory) for s in specs]


def textured_clip(directory: Path, seconds: float = 60.0, gop: int = 30, size: str = "640x360") -> Path:
    """A clip with camera-like entropy (moving test pattern + temporal noise): decoding it costs."""
    from testkit.clips import ffmpeg_exe

    path = directory / f"textured_{size}_30fps_{seconds:g}s_g{gop}.mp4"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}:rate=30:duration={seconds:g},noise=alls=12:allf=t",
                        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(gop),
                        "-keyint_min", str(gop), "-sc_threshold", "0", str(path)], check=True)
    return path
