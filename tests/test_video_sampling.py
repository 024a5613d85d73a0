"""Frame sampling formulas, checked against the worked examples in the reference notes."""

from __future__ import annotations

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
