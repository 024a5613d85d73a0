"""Synthetic h264 clips whose content fixes the caption: one coloured shape moving across a black frame.

A spec can also describe phone-style footage (testkit/footage.py encodes it): a display rotation or flip (the
picture is stored turned, so a player that honours the display matrix or the legacy ``rotate`` tag shows it
upright), variable frame rate, 10-bit or 4:2:2/4:4:4 pixels, a colour range or matrix, non-square pixels, and
cover art or a second video stream. ``width``/``height`` are always the displayed, upright size.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
DIRECTIONS = ("left", "right", "up", "down")
SHAPES = ("square", "circle")
CHUNK_FRAMES = 16
PIX_FMTS = ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le")
COLOR_RANGES = ("", "tv", "pc")
COLORSPACES = ("", "bt709", "bt470bg", "smpte170m")
EXTRA_STREAMS = ("", "cover", "second_video")


@dataclass(frozen=True)
class ClipSpec:
    """What a synthetic clip shows and how it is encoded."""

    color: str = "red"
    direction: str = "left"
    shape: str = "square"
    width: int = 320
    height: int = 240
    fps: int = 25
    seconds: float = 2.0
    gop: int = 12
    # phone-style footage (all off by default; see testkit/footage.py)
    rotation: int = 0  # display rotation, degrees counter-clockwise (ffmpeg's -display_rotation)
    hflip: bool = False  # display matrix also flips horizontally (after the rotation, as ffmpeg sets it)
    rotate_tag: bool = False  # store the rotation as the legacy clockwise `rotate` tag (mkv) instead
    vfr: bool = False  # variable frame rate: a burst at 3x fps and a pause (see footage.vfr_times)
    pix_fmt: str = "yuv420p"
    color_range: str = ""  # "" (untagged), "tv" (limited) or "pc" (full)
    colorspace: str = ""  # "" (untagged), "bt709", "bt470bg", "smpte170m"
    sar: tuple[int, int] = (1, 1)  # sample (pixel) aspect ratio; stored width = width / sar
    extra_stream: str = ""  # "cover" (attached picture) or "second_video" (a decoy stream before the real one)
    container: str = "mp4"

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {sorted(COLORS)}, got {self.color!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise ValueError(
                f"width and height must be even and >= 16 (yuv420p), got {self.width}x{self.height}"
            )
        if self.fps <= 0 or self.seconds <= 0 or self.gop < 1:
            raise ValueError(
                f"fps, seconds and gop must be positive, got {self.fps}, {self.seconds}, {self.gop}"
            )
        if self.rotation % 90 or (self.rotate_tag and (self.hflip or self.container != "mkv")):
            raise ValueError("rotation must be a multiple of 90; a rotate tag needs mkv and cannot flip")
        for name, value, allowed in (("pix_fmt", self.pix_fmt, PIX_FMTS), ("color_range", self.color_range,
                                     COLOR_RANGES), ("colorspace", self.colorspace, COLORSPACES),
                                     ("extra_stream", self.extra_stream, EXTRA_STREAMS),
                                     ("container", self.container, ("mp4", "mkv"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        stored_w = self.stored_size[1]
        if self.sar[0] < 1 or self.sar[1] < 1 or stored_w * self.sar[0] != self.upright_stored[1] * self.sar[1] \
                or stored_w % 2:
            raise ValueError(f"sar {self.sar} must turn an even stored width into {self.upright_stored[1]}")

    @property
    def caption(self) -> str:
        """The ground-truth caption, e.g. ``"a red square moves left"``."""
        return f"a {self.color} {self.shape} moves {self.direction}"

    @property
    def num_frames(self) -> int:
        """Number of frames: ``round(fps * seconds)``, at least 1 (VFR: as many as its timestamps)."""
        if self.vfr:
            return len(self.times)
        return max(1, round(self.fps * self.seconds))

    @property
    def times(self) -> tuple[float, ...]:
        """Presentation time (s) of every frame."""
        if self.vfr:
            from testkit.footage import vfr_times

            return vfr_times(self.fps, self.seconds)
        return tuple(i / self.fps for i in range(self.num_frames))

    @property
    def phone_style(self) -> bool:
        """True when anything beyond the plain CFR yuv420p mp4 is asked for."""
        return (self.rotation % 360 != 0 or self.hflip or self.vfr or self.pix_fmt != "yuv420p"
                or bool(self.color_range or self.colorspace or self.extra_stream) or self.sar != (1, 1)
                or self.container != "mp4")

    @property
    def upright_stored(self) -> tuple[int, int]:
        """(height, width) of the picture before the display rotation, at square pixels."""
        if self.rotation % 180:
            return self.width, self.height
        return self.height, self.width

    @property
    def stored_size(self) -> tuple[int, int]:
        """(height, width) of the encoded pixels."""
        h, w = self.upright_stored
        return h, w * self.sar[1] // self.sar[0]

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The shape's pure RGB colour."""
        return COLORS[self.color]

    @property
    def size(self) -> int:
        """Side (square) or diameter (circle) in pixels: a quarter of the shorter side."""
        return max(2, min(self.width, self.height) // 4)

    @property
    def filename(self) -> str:
        """A file name that encodes the whole spec (used as a cache key)."""
        secs = f"{self.seconds:g}".replace(".", "p")
        extra = ""
        if self.phone_style:
            parts = [f"r{self.rotation % 360}" if self.rotation % 360 else "", "hflip" if self.hflip else "",
                     "tag" if self.rotate_tag else "", "vfr" if self.vfr else "",
                     self.pix_fmt if self.pix_fmt != "yuv420p" else "", self.color_range, self.colorspace,
                     f"sar{self.sar[0]}-{self.sar[1]}" if self.sar != (1, 1) else "", self.extra_stream]
            extra = "".join(f"_{p}" for p in parts if p)
        return (
            f"{self.color}_{self.shape}_{self.direction}_{self.width}x{self.height}"
            f"_{self.fps}fps_{secs}s_g{self.gop}{extra}.{self.container}"
        )


def _mask(spec: ClipSpec) -> np.ndarray:
    """Boolean (size, size) mask of the shape."""
    s = spec.size
    if spec.shape == "square":
        return np.ones((s, s), dtype=bool)
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2.0
    return (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2.0) ** 2


def shape_origin(spec: ClipSpec, index: int) -> tuple[int, int]:
    """Top-left (y, x) of the shape in frame ``index``: constant speed from near one edge to near the other."""
    s = spec.size
    margin = max(1, s // 4)
    if spec.vfr:  # the shape moves at constant speed in time, whatever the frame timing
        times = spec.times
        t = times[index] / times[-1]
    else:
        t = index / (spec.num_frames - 1) if spec.num_frames > 1 else 0.5
    y_mid = (spec.height - s) // 2
    x_mid = (spec.width - s) // 2
    x_lo, x_hi = margin, spec.width - s - margin
    y_lo, y_hi = margin, spec.height - s - margin
    if spec.direction == "left":
        return y_mid, round(x_hi + (x_lo - x_hi) * t)
    if spec.direction == "right":
        return y_mid, round(x_lo + (x_hi - x_lo) * t)
    if spec.direction == "up":
        return round(y_hi + (y_lo - y_hi) * t), x_mid
    return round(y_lo + (y_hi - y_lo) * t), x_mid


def iter_chunks(spec: ClipSpec, chunk: int = CHUNK_FRAMES) -> Iterator[np.ndarray]:
    """Yield the clip's frames as uint8 (n, H, W, 3) arrays of at most ``chunk`` frames."""
    mask = _mask(spec)
    s = spec.size
    color = np.array(spec.rgb, dtype=np.uint8)
    for start in range(0, spec.num_frames, chunk):
        count = min(chunk, spec.num_frames - start)
        frames = np.zeros((count, spec.height, spec.width, 3), dtype=np.uint8)
        for i in range(count):
            y, x = shape_origin(spec, start + i)
            frames[i, y : y + s, x : x + s][mask] = color
        yield frames


def _iter_reused_frames(spec: ClipSpec) -> Iterator[np.ndarray]:
    """Yield each frame in ONE reused (H, W, 3) buffer: only the shape's old box is cleared (fast encoding)."""
    mask = _mask(spec)
    s = spec.size
    color = np.array(spec.rgb, dtype=np.uint8)
    frame = np.zeros((spec.height, spec.width, 3), dtype=np.uint8)
    for index in range(spec.num_frames):
        y, x = shape_origin(spec, index)
        frame[y : y + s, x : x + s][mask] = color
        yield frame
        frame[y : y + s, x : x + s] = 0


def render_frames_at(spec: ClipSpec, indices: list[int]) -> np.ndarray:
    """Only the frames at ``indices``, as uint8 (len(indices), H, W, 3): cheap synthetic training data."""
    mask = _mask(spec)
    s = spec.size
    out = np.zeros((len(indices), spec.height, spec.width, 3), dtype=np.uint8)
    for i, index in enumerate(indices):
        y, x = shape_origin(spec, index)
        out[i, y : y + s, x : x + s][mask] = np.array(spec.rgb, dtype=np.uint8)
    return out


def render_frames(spec: ClipSpec) -> np.ndarray:
    """All frames of ``spec`` as one uint8 (T, H, W, 3) array (a pure function of the spec)."""
    return np.concatenate(list(iter_chunks(spec)), axis=0)


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary shipped by imageio-ffmpeg."""
    try:
        import imageio_ffmpeg
    except ImportError as err:
        raise RuntimeError(
            "imageio-ffmpeg is required to encode clips (`pip install imageio-ffmpeg`)"
        ) from err
    return imageio_ffmpeg.get_ffmpeg_exe()


def _run_ffmpeg(args: list[str], what: str) -> None:
    argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    result = subprocess.run(argv, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"ffmpeg failed ({what}), code {result.returncode}: {result.stderr.decode()[-2000:]}"
        )


def write_clip(spec: ClipSpec, path: Path | str) -> Path:
    """Encode ``spec`` as an h264/yuv420p mp4 (faststart, GOP ``spec.gop``), piping raw frames to ffmpeg."""
    if spec.phone_style:
        from testkit.footage import write_footage

        return write_footage(spec, Path(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    argv = [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{spec.width}x{spec.height}", "-r", str(spec.fps),
        "-i", "pipe:0",
        "-an", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-g", str(spec.gop), "-keyint_min", str(spec.gop), "-sc_threshold", "0",
        "-r", str(spec.fps), "-movflags", "+faststart", "-f", "mp4", str(tmp),
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        for frame in _iter_reused_frames(spec):
            proc.stdin.write(memoryview(frame).cast("B"))
        proc.stdin.close()
    except BrokenPipeError:
        pass
    stderr = proc.stderr.read().decode(errors="replace")
    code = proc.wait()
    if code != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed encoding {spec} (code {code}): {stderr[-2000:]}")
    os.replace(tmp, path)
    log.info("wrote %s (%d frames) in %.2fs", path.name, spec.num_frames, time.monotonic() - started)
    return path


BROKEN_KINDS = ("zero_byte", "truncated", "garbage", "audio_only", "not_video", "no_frames", "one_frame")


def write_broken(kind: str, path: Path | str, seed: int = 1234) -> Path:
    """Write a deliberately bad video file of ``kind`` (see BROKEN_KINDS; "one_frame" is valid but tiny)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        _write_truncated(path)
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(seed).bytes(64 * 1024))
    elif kind == "audio_only":
        _run_ffmpeg(
            ["-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", "-f", "mp4", str(path)],
            "audio_only",
        )
    elif kind == "not_video":
        path.write_text("this is a text file, not a video\n" * 20)
    elif kind == "no_frames":
        # A regular mp4 drops a track without samples; a fragmented one keeps it in its empty moov.
        _run_ffmpeg(
            ["-f", "lavfi", "-i", "color=c=black:s=320x240:r=25:d=1", "-frames:v", "0",
             "-c:v", "libx264", "-pix_fmt", "yuv420p",
             "-movflags", "+empty_moov+frag_keyframe", "-f", "mp4", str(path)],
            "no_frames",
        )  # fmt: skip
    elif kind == "one_frame":
        write_clip(ClipSpec(color="green", direction="right", fps=25, seconds=1 / 25, gop=1), path)
    else:
        raise ValueError(f"unknown broken kind {kind!r}; expected one of {BROKEN_KINDS}")
    return path


def _write_truncated(path: Path) -> None:
    """A real faststart mp4 cut to a third of its bytes: the moov header parses, frame data is missing."""
    full = path.with_name(f".{path.name}.full.mp4")
    write_clip(ClipSpec(color="blue", direction="up", width=320, height=240, fps=25, seconds=4, gop=25), full)
    data = full.read_bytes()
    full.unlink()
    moov, mdat = data.find(b"moov"), data.find(b"mdat")
    cut = len(data) // 3
    if not 0 <= moov < mdat < cut:
        raise RuntimeError(
            f"truncated clip: expected moov ({moov}) before mdat ({mdat}) within the first third"
        )
    path.write_bytes(data[:cut])


def broken_set(directory: Path | str) -> dict[str, Path]:
    """Write every broken kind into ``directory``; returns kind -> path."""
    directory = Path(directory)
    names = {"audio_only": "audio_only.mp4", "not_video": "not_video.mp4"}
    return {kind: write_broken(kind, directory / names.get(kind, f"{kind}.mp4")) for kind in BROKEN_KINDS}


STANDARD_SPECS: tuple[ClipSpec, ...] = (
    ClipSpec("red", "left", "square", 320, 240, 24, 1, 1),
    ClipSpec("green", "right", "circle", 320, 240, 25, 2, 12),
    ClipSpec("blue", "up", "square", 640, 360, 30, 3, 250),
    ClipSpec("yellow", "down", "circle", 426, 240, 25, 5, 12),
    ClipSpec("red", "up", "circle", 640, 480, 24, 10, 250),
    ClipSpec("green", "down", "square", 1280, 720, 30, 4, 1),
    ClipSpec("blue", "left", "circle", 854, 480, 25, 8, 12),
    ClipSpec("yellow", "right", "square", 1280, 720, 30, 60, 250),
)


def _cached(path: Path) -> bool:
    """True if ``path`` (named after its spec) is complete: it has the size recorded when it was written."""
    stamp = path.with_name(path.name + ".size")
    try:
        return path.stat().st_size == int(stamp.read_text()) > 0
    except (OSError, ValueError):
        return False


def ensure_clip(spec: ClipSpec, directory: Path | str) -> Path:
    """Path of ``spec``'s clip in ``directory``, encoding it only if no complete copy is there."""
    path = Path(directory) / spec.filename
    if not _cached(path):
        write_clip(spec, path)
        path.with_name(path.name + ".size").write_text(str(path.stat().st_size))
    return path


def standard_set(
    directory: Path | str, specs: tuple[ClipSpec, ...] = STANDARD_SPECS
) -> list[tuple[Path, ClipSpec]]:
    """The varied standard clip set (1-60 s, 320x240-1280x720, 24/25/30 fps, GOP 1/12/250), cached by spec."""
    started = time.monotonic()
    clips = [(ensure_clip(spec, directory), spec) for spec in specs]
    log.info("standard clip set ready in %.1fs (%d clips)", time.monotonic() - started, len(clips))
    return clips
