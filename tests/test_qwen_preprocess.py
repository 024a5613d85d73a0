"""Qwen2-VL preprocessing: our numpy path against transformers' own functions, on real encoded clips."""

from __future__ import annotations

import numpy as np
import pytest

from captioning_core import video
from captioning_core.models.qwen2_vl import PatchConfig, Qwen2VLOptions, patchify, sample_frames

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "opts",
    [Qwen2VLOptions(), Qwen2VLOptions(height=112, width=112, fps=2, min_pixels=3136)],
    ids=["seed-default", "tiny-profile"],
)
def test_patchify_matches_hf_image_processor(standard_clips, opts):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    hf = Qwen2VLImageProcessor()
    checked = 0
    for path, spec in standard_clips:
        if spec.seconds > 10:
            continue  # long clips cover sampling, not layout; keep this test quick
        frames = sample_frames(str(path), opts)
        ours, grid = patchify(frames, PatchConfig())
        ref = hf(images=None, videos=[list(frames)], return_tensors="np")
        assert tuple(ref["video_grid_thw"][0]) == grid
        np.testing.assert_allclose(ours, ref["pixel_values_videos"], rtol=0, atol=2e-5)
        checked += 1
    assert checked >= 3


def test_pixel_budget_keeps_aspect_ratio_in_multiples_of_28(standard_clips):
    opts = Qwen2VLOptions()
    for path, spec in standard_clips:
        frames = sample_frames(str(path), opts)
        _, h, w, _ = frames.shape
        assert h % 28 == 0 and w % 28 == 0
        assert opts.min_pixels <= h * w <= opts.max_pixels
        assert abs(w / h - spec.width / spec.height) < 0.15 * spec.width / spec.height


def test_frame_count_follows_fps_and_clamps(standard_clips):
    for path, spec in standard_clips:
        reader = video.open_video(str(path))
        n = video.qwen_frame_count(len(reader), reader.get_avg_fps(), fps=4)
        expected = round(min(max(spec.seconds * 4, 4), min(768, len(reader))) / 2) * 2
        assert n == expected, spec
        frames = sample_frames(str(path), Qwen2VLOptions(fps=4))
        assert frames.shape[0] == n


def test_one_frame_video_is_sampled_twice(broken_clips):
    frames = sample_frames(str(broken_clips["one_frame"]), Qwen2VLOptions())
    assert frames.shape[0] == 2
    np.testing.assert_array_equal(frames[0], frames[1])


@pytest.mark.parametrize(
    "kind", ["zero_byte", "truncated", "garbage", "audio_only", "not_video", "no_frames"]
)
def test_broken_clips_raise_video_error(broken_clips, kind):
    with pytest.raises(video.VideoError):
        sample_frames(str(broken_clips[kind]), Qwen2VLOptions())
