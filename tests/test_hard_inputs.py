"""Inputs that are valid but extreme, captioned end to end under real msrun on SeaweedFS: a 4K clip, a
10-minute clip, and existing files whose keys hold spaces, quotes and non-ASCII characters."""

from __future__ import annotations

import shutil

import pytest

from captioning_core.models.qwen2_vl import PatchConfig, context_video_tokens, sample_frames
from testkit.airflow_env import TINY_QWEN2VL
from testkit.clips import ClipSpec, ensure_clip
from testkit.outputs import read_csv_from_s3
from testkit.partition import upload_partition
from testkit.profile import TINY, TINY_ARGS

UHD = ClipSpec("blue", "right", "square", 3840, 2160, 30, 1.0, 30)
LONG = ClipSpec("yellow", "up", "circle", 320, 240, 25, 600.0, 250)  # 15,000 frames
SMALL = ClipSpec("green", "down", "square", 320, 240, 25, 2.0, 12)
ODD_NAME = "vidéo 日本語 — ✓ (copy) 'x' #1.mp4"


@pytest.fixture(scope="module")
def hard_clips(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hard-clips")
    renamed = directory / ODD_NAME
    shutil.copy(ensure_clip(SMALL, directory), renamed)
    return {"uhd": ensure_clip(UHD, directory), "long": ensure_clip(LONG, directory), "odd": renamed}


def test_long_video_tokens_stay_within_the_models_context(hard_clips):
    """768 frames (the Qwen2-VL cap) of a 10-minute clip would need more tokens than the tiny model's
    4096-position context; the budget shrinks frames, then their number, to fit."""
    patch = PatchConfig.from_model_dir(str(TINY_QWEN2VL))
    budget = context_video_tokens(str(TINY_QWEN2VL), max_new_tokens=12)
    assert budget == 4096 - 12 - 256
    loose = TINY.qwen2vl_options()
    uncapped = sample_frames(str(hard_clips["long"]), loose, patch)
    assert uncapped.shape[0] == 768 and _tokens(uncapped, patch) > 4096
    for cap in (budget, 500, 10):
        opts = TINY.qwen2vl_options(max_video_tokens=cap)
        frames = sample_frames(str(hard_clips["long"]), opts, patch)
        assert _tokens(frames, patch) <= cap, cap
        assert frames.shape[0] >= 2 and frames.shape[0] % 2 == 0
    short = sample_frames(str(hard_clips["odd"]), TINY.qwen2vl_options(max_video_tokens=budget), patch)
    assert short.shape == sample_frames(str(hard_clips["odd"]), loose, patch).shape  # short clips: untouched


def _tokens(frames, patch: PatchConfig) -> int:
    t, h, w = frames.shape[:3]
    return patch.temporal_groups(t) * (h * w) // patch.token_pixels


@pytest.mark.integration
@pytest.mark.msrun
def test_4k_long_and_oddly_named_videos_are_captioned(s3_server, s3_bucket, hard_clips, run_msrun, tmp_path):
    client = s3_server.client()
    clips = [(hard_clips["uhd"], UHD, "good"), (hard_clips["long"], LONG, "good"), (hard_clips["odd"], SMALL, "good")]
    meta, rows = upload_partition(client, s3_bucket, "hard inputs/ünï cødé", clips)
    assert "日本語" in rows[2].path
    result = run_msrun(meta, *TINY_ARGS, "--bs", "1", log_dir=tmp_path / "log")
    assert result.returncode == 0, result.tail
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", "meta_caption_qwen2vl.csv"))
    assert out["path"].tolist() == [r.path for r in rows]
    assert out["caption_status"].tolist() == ["ok"] * 3
    assert out["text"][0] == UHD.caption
    assert out["text"][2] == SMALL.caption
    # The tiny model never saw hundreds of frames in training: of the long clip it gets the colour right,
    # while shape and direction at 6 tokens a frame pair are beyond it. A real model sees the same frames.
    assert out["text"][1].startswith("a yellow"), out["text"][1]
