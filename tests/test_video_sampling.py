"""Frame sampling formulas (worked examples from the reference notes) and frame-exact reading of real clips."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest

from captioning_core import video


def test_qwen_indices_worked_example():
    # 150 frames at 30 fps sampled at 4 fps -> 20 frames (qwen-vl-utils linspace + round)
    n = video.qwen_frame_count(150, 30.0, 4)
    assert n == 20
    assert video.qwen_frame_indices(150, n) == [
        0,
        8,
        16,
        24,
        31,
        39,
        47,
        55,
        63,
        71,
        78,
        86,
        94,
        102,
        110,
        118,
        125,
        133,
        141,
        149,
    ]


@pytest.mark.parametrize(
    ("total", "fps_in", "fps", "want"),
    [
        (10, 30.0, 4, 4),  # short clip: at least 4 frames
        (3, 30.0, 4, 2),  # never more than the clip has (rounded down to even)
        (1, 30.0, 4, 2),  # a single frame is used twice (temporal patch of 2)
        (100000, 30.0, 4, 768),  # long clip: at most 768
    ],
)
def test_qwen_frame_count_clamps(total, fps_in, fps, want):
    assert video.qwen_frame_count(total, fps_in, fps) == want


def test_qwen_target_size_worked_examples():
    assert video.qwen_target_size(1080, 1920, 448 * 672) == (392, 728)
    assert video.qwen_target_size(480, 854, 672 * 1008) == (476, 840)


def test_qwen_target_size_equals_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    sizes = [(240, 320), (2160, 3840), (1, 1), (14, 20), (10, 1999), (720, 1280)]
    sizes += [tuple(int(x) for x in rng.integers(1, 4000, size=2)) for _ in range(300)]
    budgets = [(3136, 12544), (100352, 301056), (3136, 7056), (100352, 602112)]
    for height, width in sizes:
        for lo, hi in budgets:
            try:
                want = smart_resize(height, width, factor=28, min_pixels=lo, max_pixels=hi)
            except ValueError:
                with pytest.raises(video.VideoError, match="aspect ratio"):
                    video.qwen_target_size(height, width, hi, lo)
                continue
            assert video.qwen_target_size(height, width, hi, lo) == want, (height, width, lo, hi)


def test_pllava_segment_centres_worked_examples():
    assert video.pllava_frame_indices(150, 4) == [18, 55, 92, 130]
    assert video.pllava_frame_indices(150, 16) == [
        4,
        13,
        23,
        32,
        41,
        51,
        60,
        69,
        78,
        88,
        97,
        106,
        116,
        125,
        134,
        144,
    ]


def test_bad_fps_is_a_video_error():
    with pytest.raises(video.VideoError):
        video.qwen_frame_count(100, 0.0, 4)


# -- read_frames (PyAV seek-and-decode) against decord on real encoded clips -------------------------------

def _reencode(src: Path, dst: Path, *args: str) -> Path:
    """Re-encode ``src`` with ffmpeg options the clip factory does not offer (B-frames, open GOPs, tags)."""
    from testkit.clips import ffmpeg_exe

    if not dst.exists():
        tmp = dst.with_name(f".{dst.stem}.part{dst.suffix}")
        subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(src),
                        "-an", *args, str(tmp)], check=True)
        tmp.replace(dst)
    return dst


@pytest.fixture(scope="module")
def sampling_clips(clip_dir: Path) -> dict[str, Path]:
    from testkit.clips import ClipSpec, ensure_clip

    clips = {f"gop{gop}": ensure_clip(ClipSpec("red", "left", "square", 320, 240, 30, 12.0, gop), clip_dir)
             for gop in (1, 30, 250)}
    src = clips["gop30"]
    x264 = ["-c:v", "libx264", "-preset", "medium", "-pix_fmt", "yuv420p", "-g", "60"]
    clips["bframes"] = _reencode(src, clip_dir / "sampling_bframes.mp4", *x264, "-bf", "3")
    clips["bframes_mkv"] = _reencode(src, clip_dir / "sampling_bframes.mkv", *x264, "-bf", "2")
    clips["full_range_bt709"] = _reencode(
        src, clip_dir / "sampling_fullrange_bt709.mp4", "-c:v", "libx264", "-preset", "ultrafast",
        "-pix_fmt", "yuvj420p", "-g", "30", "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709")
    return clips


def _index_sets(n: int) -> dict[str, list[int]]:
    return {
        "qwen 4 fps": video.qwen_frame_indices(n, video.qwen_frame_count(n, 30.0, 4)),
        "qwen 2 fps": video.qwen_frame_indices(n, video.qwen_frame_count(n, 30.0, 2)),
        "pllava 16": video.pllava_frame_indices(n, 16),
        "pllava 4": video.pllava_frame_indices(n, 4),
        "unsorted, repeated, ends": [n - 1, 0, n // 2, n // 2, 1, n - 2],
        "every frame": list(range(n)),
    }


@pytest.mark.integration
@pytest.mark.parametrize("name", ["gop1", "gop30", "gop250", "bframes", "bframes_mkv", "full_range_bt709"])
def test_read_frames_equals_decord_get_batch_pixel_for_pixel(sampling_clips, name, caplog):
    path = str(sampling_clips[name])
    reader = video.open_video(path)
    caplog.set_level(logging.DEBUG, logger="captioning_core.video")
    for what, indices in _index_sets(len(reader)).items():
        ours = video.read_frames(reader, indices)
        ref = video.read_frames_decord(video.open_video(path), indices)
        assert ours.shape == ref.shape, what
        assert np.array_equal(ours, ref), f"{name}, {what}: frames differ from decord's get_batch"
    assert "get_batch" not in caplog.text, "PyAV's table should match decord's on these clips (no fallback)"


@pytest.mark.integration
def test_read_frames_is_exact_on_open_gop_b_frames(sampling_clips, clip_dir):
    """Open GOPs: each frame equals the one a plain decode from frame 0 gives (decord's get_batch may not)."""
    path = str(_reencode(sampling_clips["gop30"], clip_dir / "sampling_open_gop.mp4", "-c:v", "libx264",
                         "-preset", "medium", "-pix_fmt", "yuv420p", "-g", "60", "-bf", "3",
                         "-x264-params", "open-gop=1"))
    reader = video.open_video(path)
    every = video.read_frames_decord(reader, list(range(len(reader))))  # one forward pass, no seeks
    for what, indices in _index_sets(len(reader)).items():
        assert np.array_equal(video.read_frames(video.open_video(path), indices), every[indices]), what


@pytest.mark.integration
def test_read_frames_falls_back_to_decord_when_tables_disagree(sampling_clips, monkeypatch):
    path = str(sampling_clips["gop30"])
    indices = video.pllava_frame_indices(360, 4)
    ref = video.read_frames_decord(video.open_video(path), indices)

    def mismatch(*_args):
        raise video._TableMismatch("forced")

    monkeypatch.setattr(video, "_read_pyav", mismatch)
    assert np.array_equal(video.read_frames(video.open_video(path), indices), ref)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["truncated", "garbage", "zero_byte"])
def test_read_frames_keeps_video_error_for_broken_clips(broken_clips, kind):
    with pytest.raises(video.VideoError):
        reader = video.open_video(str(broken_clips[kind]))
        video.read_frames(reader, list(range(len(reader))))


def test_out_of_range_indices_are_a_video_error(sampling_clips):
    reader = video.open_video(str(sampling_clips["gop1"]))
    with pytest.raises(video.VideoError):
        video.read_frames(reader, [len(reader)])
