"""Video reading with decord and frame sampling for both model families.

Qwen2-VL: frames sampled at ``fps`` the way qwen-vl-utils does (clamped to [4, min(768, total)] and
rounded to an even count), then resized so that height*width stays within a pixel budget at the video's
aspect ratio, in multiples of 28 (transformers' ``smart_resize``).
PLLaVA: ``num_frames`` frames at segment centres (``ChatPllava.get_index``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

QWEN_FRAME_FACTOR = 2
QWEN_MIN_FRAMES = 4
QWEN_MAX_FRAMES = 768
QWEN_SIZE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28


class VideoError(Exception):
    """A video that cannot be read or sampled; recorded as a per-row failure."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def open_video(path: str):
    """Open ``path`` with decord; every decord failure becomes a VideoError with the reason."""
    import decord

    try:
        # 0 = decoder threads chosen by FFmpeg; set CAPTION_DECODE_THREADS to pin it (e.g. 1 with many workers)
        reader = decord.VideoReader(path, ctx=decord.cpu(0),
                                    num_threads=int(os.environ.get("CAPTION_DECODE_THREADS", "0")))
    except Exception as err:  # decord raises DECORDError, which is not a RuntimeError
        raise VideoError(f"cannot open video: {_short(err)}") from err
    if len(reader) == 0:
        raise VideoError("video has no decodable frames")
    return reader


def probe(path: str) -> VideoInfo:
    """Frame count, fps and size of a video, without decoding every frame."""
    reader = open_video(path)
    height, width = read_frames(reader, [0]).shape[1:3]
    return VideoInfo(len(reader), float(reader.get_avg_fps() or 0.0), int(height), int(width))


def read_frames(reader, indices: list[int]) -> np.ndarray:
    """Decode the frames at ``indices`` as a uint8 (T, H, W, 3) array."""
    try:
        frames = reader.get_batch(indices).asnumpy()
    except Exception as err:
        raise VideoError(f"cannot decode frames: {_short(err)}") from err
    if frames.ndim != 4 or frames.shape[0] != len(indices):
        raise VideoError(f"decoder returned {frames.shape} for {len(indices)} frames")
    return frames


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


def qwen_target_size(height: int, width: int, max_pixels: int,
                     min_pixels: int = VIDEO_MIN_PIXELS) -> tuple[int, int]:
    """(h, w) in multiples of 28 with h*w within [min_pixels, max_pixels], keeping the aspect ratio."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    try:
        return smart_resize(height, width, factor=QWEN_SIZE_FACTOR, min_pixels=min_pixels,
                            max_pixels=max_pixels)
    except ValueError as err:
        raise VideoError(str(err)) from err


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


def _short(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else text[:limit] + "..."
