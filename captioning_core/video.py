"""Video reading (decord for the frame table, PyAV for sampled decoding) and frame sampling for every captioner.

Qwen2-VL: frames sampled at ``fps`` the way qwen-vl-utils does (clamped to [4, min(768, total)] and
rounded to an even count), then resized so that height*width stays within a pixel budget at the video's
aspect ratio, in multiples of 28 (transformers' ``smart_resize``).
PLLaVA: ``num_frames`` frames at segment centres (``ChatPllava.get_index``).

Frame counts, fps and indices are decord's (what both seeds sample with). The sampled frames are decoded by
PyAV: decode forward, seek only when that skips more than a few frames, and convert only the wanted frames
to RGB. It is as fast as decord's ``get_batch`` or faster in total, and frame-exact on open-GOP clips, where
``get_batch`` is not; see docs/BENCHMARKS.md. When PyAV's packet table does not match
decord's frame table exactly (edit-list discards, missing timestamps, a truncated file), ``read_frames`` uses
``get_batch``, so the frames returned are always decord's frames at those indices. With several video streams
(or cover art stored as one) PyAV reads the stream decord reads: FFmpeg's best stream, never an attached picture.

Frames come out as a player shows them (``captioning_core.orientation``): display rotation and flips applied, non-square
pixels stretched, 10-bit and other formats converted to RGB as ffmpeg does, before any model resizing.
Qwen2-VL's ``fps`` sampling follows presentation time on variable-frame-rate clips (``qwen_sample_indices``);
constant-rate clips keep the index formula, so their frames are unchanged.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from captioning_core.orientation import Display, RgbConverter, display_of, pick_stream, probe_display

QWEN_FRAME_FACTOR = 2
QWEN_MIN_FRAMES = 4
QWEN_MAX_FRAMES = 768
QWEN_SIZE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
# Seek only when it skips more frames than this: a seek (demuxer reposition + decoder flush) costs about as
# much as decoding a few frames, so dense sampling decodes straight through (docs/BENCHMARKS.md, item 3).
SEEK_MIN_SKIP = int(os.environ.get("CAPTION_SEEK_MIN_SKIP", "8"))
# A clip is constant-rate when every frame time is within this fraction of a frame of an even grid from the
# first to the last frame: timebase rounding (1 ms in Matroska, 1/90000 s in mp4) stays far below it, and
# index sampling then lands within a tenth of a frame of the time targets; pauses and bursts are far above it.
CFR_TOLERANCE = 0.1

log = logging.getLogger(__name__)


class VideoError(Exception):
    """A video that cannot be read or sampled; recorded as a per-row failure."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


@dataclass
class Video:
    """An opened video: decord's reader (frame table, fps, fallback decoding) and the path PyAV decodes."""

    path: str
    reader: Any

    def __len__(self) -> int:
        return len(self.reader)

    def get_avg_fps(self) -> float:
        return self.reader.get_avg_fps()


def _decode_threads() -> int:
    # 0 = decoder threads chosen by FFmpeg; set CAPTION_DECODE_THREADS to pin it (e.g. 1 with many workers)
    return int(os.environ.get("CAPTION_DECODE_THREADS", "0"))


def open_video(path: str) -> Video:
    """Open ``path`` with decord; every decord failure becomes a VideoError with the reason."""
    import decord

    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=_decode_threads())
    except Exception as err:  # decord raises DECORDError, which is not a RuntimeError
        raise VideoError(f"cannot open video: {_short(err)}") from err
    if len(reader) == 0:
        raise VideoError("video has no decodable frames")
    return Video(str(path), reader)


def probe(path: str) -> VideoInfo:
    """Frame count, fps and displayed size (rotation and pixel aspect applied) of a video, from its first frame."""
    reader = open_video(path)
    height, width = read_frames(reader, [0]).shape[1:3]
    return VideoInfo(len(reader), float(reader.get_avg_fps() or 0.0), int(height), int(width))


@dataclass
class DecodePolicy:
    """How this process decodes: in a child process (``sandbox``, a DecodeSandbox) or here, and the cap on
    the raw frames one decode may produce (``max_bytes``, 0: none). The rank runner sets it for a run."""

    sandbox: Any = None
    max_bytes: int = 0


_policy = DecodePolicy()


@contextlib.contextmanager
def decode_policy(policy: DecodePolicy) -> Iterator[None]:
    """``read_frames`` follows ``policy`` inside the block (process-wide: the rank's decode threads too)."""
    global _policy
    outer, _policy = _policy, policy
    try:
        yield
    finally:
        _policy = outer


def check_decode_budget(count: int, height: int, width: int, max_bytes: int) -> None:
    """Refuse a decode whose raw RGB frames would exceed ``max_bytes`` (0: no cap) before decoding any."""
    need = int(count) * int(height) * int(width) * 3
    if max_bytes and need > max_bytes:
        raise VideoError(f"decoding {count} frames of {width}x{height} needs {need / 2**30:.1f} GiB of "
                         f"frames, over --max_decode_bytes ({max_bytes / 2**30:.1f} GiB)")


def _stored_size(path: str) -> tuple[int, int] | None:
    """(height, width) of the stream decord decodes, from the container header (no decoding); None if unknown."""
    import av

    try:
        with av.open(path) as container:
            ctx = pick_stream(container).codec_context
            return int(ctx.height), int(ctx.width)
    except Exception:  # noqa: BLE001 - decord decides readability
        return None


def read_frames(video: Video, indices: list[int]) -> np.ndarray:
    """Decode the frames at ``indices`` as displayed, uint8 (T, H, W, 3): decord's frames there, shown upright.
    Where and within what is the process's :class:`DecodePolicy` (the runner decodes in child processes)."""
    indices = [int(i) for i in indices]
    total = len(video)
    if not indices or min(indices) < 0 or max(indices) >= total:
        raise VideoError(f"frame indices out of range for a {total}-frame video: {indices[:8]}")
    policy = _policy
    if policy.sandbox is not None:
        return policy.sandbox.read_frames(video.path, indices, policy.max_bytes)
    return read_frames_here(video, indices, policy.max_bytes)


def read_frames_here(video: Video, indices: list[int], max_bytes: int = 0) -> np.ndarray:
    """``read_frames`` in this process: the stored size is checked against ``max_bytes`` before decoding."""
    size = _stored_size(video.path) if max_bytes else None
    if size is not None:
        check_decode_budget(len(indices), *size, max_bytes)
    total = len(video)
    frames = None
    try:
        frames, display = _read_pyav(video.path, indices, total)
    except _TableMismatch as why:
        log.debug("%s: decoding with decord's get_batch (%s)", video.path, why)
    except Exception as err:  # decord decides whether the clip is readable; it raises the VideoError
        log.debug("%s: PyAV failed (%s); decoding with decord's get_batch", video.path, _short(err))
    if frames is None:
        frames = _read_decord(video.reader, indices)
        display = probe_display(video.path)
        frames = display.from_decord(frames)
    if frames.ndim != 4 or frames.shape[0] != len(indices):
        raise VideoError(f"decoder returned {frames.shape} for {len(indices)} frames")
    return display.apply(frames)


def read_frames_decord(video: Video, indices: list[int]) -> np.ndarray:
    """decord's ``get_batch`` of ``indices`` as decord returns them (the reference on upright clips; the
    benchmark's baseline)."""
    return _read_decord(video.reader, [int(i) for i in indices])


def _read_decord(reader, indices: list[int]) -> np.ndarray:
    try:
        return reader.get_batch(indices).asnumpy()
    except Exception as err:
        raise VideoError(f"cannot decode frames: {_short(err)}") from err


class _TableMismatch(Exception):
    """PyAV's view of the stream differs from decord's frame table: use decord."""


def _read_pyav(path: str, indices: list[int], total: int) -> tuple[np.ndarray, Display]:
    """Stored frames at ``indices`` (frame i = the i-th smallest packet pts, as decord numbers them), and how
    to display them."""
    import av

    with av.open(path) as container:
        stream = pick_stream(container)  # decord's choice; cover art and extra streams are skipped
        stream.thread_type = "AUTO"  # frame + slice threads, as decord uses: ~2x on camera-like content
        stream.thread_count = _decode_threads()
        pts, key_pts = [], []
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's flush packet
                continue
            if packet.pts is None or packet.is_discard:
                raise _TableMismatch("a packet without pts or marked discard")
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
        pts.sort()
        rank = {p: i for i, p in enumerate(pts)}
        if len(pts) != total or len(rank) != total or not key_pts:
            raise _TableMismatch(f"{len(pts)} packets ({len(rank)} distinct pts) for {total} frames")
        keys = sorted(rank[p] for p in key_pts)
        if keys[0] != 0:
            raise _TableMismatch("first frame is not a keyframe")
        slots: dict[int, list[int]] = {}
        for k, index in enumerate(indices):
            slots.setdefault(index, []).append(k)
        out = None
        display = None
        to_rgb = RgbConverter(stream)  # one swscale context for the clip (a frame's own is rebuilt per frame)
        frames = None
        next_index = -1  # index of the next frame the decoder will give; -1 = nothing decoded yet
        for index in sorted(slots):
            key = keys[bisect.bisect_right(keys, index) - 1]
            if next_index < 0 or key - next_index > SEEK_MIN_SKIP:  # seeking skips decoding enough frames
                container.seek(pts[key], stream=stream, backward=True)
                frames = container.decode(stream)
            for frame in frames:
                at = rank.get(frame.pts, -1)
                next_index = at + 1
                if at == index:
                    rgb = to_rgb(frame)
                    if out is None:
                        out = np.empty((len(indices), *rgb.shape), dtype=np.uint8)
                        display = display_of(stream, frame)
                    out[slots[index]] = rgb
                    break
                if at > index or at < 0:
                    raise _TableMismatch(f"decoder gave frame {at} while looking for {index}")
            else:
                raise _TableMismatch(f"decoder ended before frame {index}")
    return out, display


def qwen_frame_count(total_frames: int, video_fps: float, fps: float,
                     min_frames: int = QWEN_MIN_FRAMES, max_frames: int = QWEN_MAX_FRAMES) -> int:
    """How many frames Qwen2-VL samples from a video (qwen-vl-utils ``smart_nframes``).

    Follows qwen-vl-utils 0.0.8, plus its later fix that never asks for more frames than the video has:
    a 1-frame clip yields 2 (the frame twice), which Qwen2-VL's temporal patch of 2 needs.
    """
    if total_frames < 1:
        raise VideoError("video has no frames")
    if video_fps <= 0:
        raise VideoError(f"video reports fps {video_fps}")
    lo = math.ceil(min_frames / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
    hi = math.floor(min(max_frames, total_frames) / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
    wanted = total_frames / video_fps * fps
    n = min(max(wanted, lo), max(hi, QWEN_FRAME_FACTOR))
    n = round(n / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
    return int(max(QWEN_FRAME_FACTOR, n))


def qwen_frame_indices(total_frames: int, nframes: int) -> list[int]:
    """Evenly spaced indices from first to last frame, rounded half-to-even like torch's ``round``."""
    return [int(i) for i in np.round(np.linspace(0, total_frames - 1, nframes)).astype(int)]


def frame_times(video: Video) -> np.ndarray:
    """Presentation time (seconds) of every frame, in decord's frame order."""
    try:
        return np.asarray(video.reader.get_frame_timestamp(list(range(len(video)))), dtype=np.float64)[:, 0]
    except Exception as err:
        raise VideoError(f"cannot read frame timestamps: {_short(err)}") from err


def is_constant_rate(times: np.ndarray) -> bool:
    """True when every frame time is within CFR_TOLERANCE of a frame of an even grid (or there are < 3 frames)."""
    if len(times) < 3:
        return True
    step = float(times[-1] - times[0]) / (len(times) - 1)
    grid = times[0] + step * np.arange(len(times))
    return float(np.max(np.abs(times - grid))) <= CFR_TOLERANCE * abs(step)


def qwen_sample_indices(video: Video, fps: float) -> list[int]:
    """The frames Qwen2-VL samples at ``fps``: evenly spaced in presentation time.

    On constant-rate clips that is qwen-vl-utils' index formula exactly (``qwen_frame_indices``). On
    variable-rate clips (phone footage with pauses and bursts) the count comes from the real duration and each
    sample is the frame nearest an evenly spaced target time, so a burst does not get more samples than a pause.
    """
    total = len(video)
    try:
        times = frame_times(video) if total >= 3 else np.zeros(0)
    except VideoError as err:  # no usable time table: the index formula, as before
        log.debug("%s: sampling by index (%s)", video.path, err)
        times = np.zeros(0)
    if is_constant_rate(times) or not np.all(np.diff(times) > 0):  # CFR, or times we cannot trust
        return qwen_frame_indices(total, qwen_frame_count(total, float(video.get_avg_fps() or 0.0), fps))
    step = float(np.median(np.diff(times)))
    duration = float(times[-1] - times[0]) + step
    return qwen_time_indices(times, qwen_frame_count(total, total / duration, fps))


def qwen_time_indices(times: np.ndarray, nframes: int) -> list[int]:
    """For ``nframes`` targets evenly spaced from the first to the last frame's time, the nearest frame each."""
    targets = np.linspace(times[0], times[-1], nframes)
    right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
    left = right - 1
    nearer_left = (targets - times[left]) <= (times[right] - targets)
    return [int(i) for i in np.where(nearer_left, left, right)]


def qwen_target_size(height: int, width: int, max_pixels: int,
                     min_pixels: int = VIDEO_MIN_PIXELS) -> tuple[int, int]:
    """(h, w) in multiples of 28 with h*w within [min_pixels, max_pixels], keeping the aspect ratio.

    The arithmetic of transformers' ``smart_resize`` for Qwen2-VL (tests/test_video_sampling.py checks it
    equal), written out so that decode threads need no transformers import: they then run while the main
    thread imports mindnlp and loads the model.
    """
    factor = QWEN_SIZE_FACTOR
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pllava_frame_indices(total_frames: int, num_segments: int) -> list[int]:
    """Segment-centre indices as PLLaVA samples them (``seg = (N-1)/S``; start at ``seg/2``)."""
    seg = (total_frames - 1) / num_segments
    start = int(seg / 2)
    return [start + int(np.round(seg * k)) for k in range(num_segments)]


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize (antialiased when shrinking) of a uint8 (T, H, W, 3) array."""
    from PIL import Image

    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))
    return out


def resize_frames_float(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a uint8 (T, H, W, 3) array as torchvision resizes a uint8 tensor (what transformers'
    fast video processors do): antialiased separable filter (a = -0.5, support scaled when shrinking), width
    then height, float32 throughout, then clamp and round. ``resize_frames`` (PIL) rounds to uint8 between the
    two passes and uses fixed-point weights, so it differs by a few grey levels along edges."""
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames
    out = frames.astype(np.float32)
    out = _resample_axis(out, 2, width)
    out = _resample_axis(out, 1, height)
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def _bicubic_aa(x: np.ndarray) -> np.ndarray:
    a = np.float32(-0.5)
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


def _resample_axis(data: np.ndarray, axis: int, size: int) -> np.ndarray:
    """One antialiased bicubic pass along ``axis``: per output index, taps and normalised weights computed
    and accumulated in float32, tap by tap (the order of torch's CPU kernel)."""
    length = data.shape[axis]
    if length == size:
        return data
    scale = np.float32(length / size)
    support = np.float32(2.0) * scale if scale >= 1 else np.float32(2.0)
    invscale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    centers = scale * (np.arange(size, dtype=np.float32) + np.float32(0.5))
    xmin = np.maximum((centers - support + np.float32(0.5)).astype(np.int64), 0)
    xmax = np.minimum((centers + support + np.float32(0.5)).astype(np.int64), length)
    taps = int((xmax - xmin).max())
    j = np.arange(taps)
    idx = xmin[:, None] + j[None, :]
    weights = _bicubic_aa((idx.astype(np.float32) - centers[:, None] + np.float32(0.5)) * invscale)
    weights[idx >= xmax[:, None]] = 0
    total = weights.sum(axis=1, dtype=np.float32)
    weights /= np.where(total == 0, 1, total)[:, None]  # an all-zero row stays zero
    idx = np.minimum(idx, length - 1)
    moved = np.moveaxis(data, axis, 0)
    acc = np.zeros((size, *moved.shape[1:]), dtype=np.float32)
    shape = (size,) + (1,) * (moved.ndim - 1)
    for tap in range(taps):
        acc += moved[idx[:, tap]] * weights[:, tap].reshape(shape)
    return np.moveaxis(acc, 0, axis)


def _short(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else text[:limit] + "..."
