"""Qwen2-VL preprocessing: our numpy path against transformers' own functions, on real encoded clips."""

from __future__ import annotations

import numpy as np
import pytest

from captioning_core import video
from captioning_core.models.qwen2_vl import PatchConfig, Qwen2VLOptions, patchify, sample_frames
from testkit.profile import TINY

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "opts",
    [Qwen2VLOptions(), TINY.qwen2vl_options()],
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


def _hf_qwen2_5_vl_processor(model_dir: str):
    """transformers' ``Qwen2_5_VLProcessor`` (prompt expansion, ``second_per_grid_ts``) over the checkpoint's
    tokenizer and image processor. Its video processor needs torchvision, which cannot share a venv with
    mindnlp; the stand-in hands the frames to ``Qwen2VLImageProcessor``'s video path (same patch arithmetic,
    checked above)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor.from_pretrained(model_dir)

    class FramesAsVideo:
        temporal_patch_size = image_processor.temporal_patch_size
        merge_size = image_processor.merge_size

        def __call__(self, videos=None, **_):
            return image_processor(images=None, videos=videos, return_tensors="np")

    proc = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)  # __init__ would build the torchvision processor
    tok = AutoTokenizer.from_pretrained(model_dir)
    proc.image_processor, proc.tokenizer, proc.video_processor, proc.chat_template = (
        image_processor, tok, FramesAsVideo(), None)
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id, proc.video_token_id = (tok.convert_tokens_to_ids(proc.image_token),
                                                tok.convert_tokens_to_ids(proc.video_token))
    return proc


def test_qwen2_5vl_inputs_equal_the_hf_processor(standard_clips):
    """Pixels, grid, prompt ids and seconds per temporal group, with the sampling rate qwen-vl-utils reports."""
    from pathlib import Path

    from captioning_core.config import RunConfig
    from captioning_core.models.qwen2_5_vl import Qwen2_5VLCaptioner

    model_dir = str(Path(__file__).resolve().parents[1] / "tiny_models" / "qwen2_5vl")
    cap = Qwen2_5VLCaptioner(RunConfig(meta_path="m.csv", model="qwen2_5vl", pretrained_model_name_or_path=model_dir,
                                       device_target="CPU", model_options={"height": 112, "width": 112,
                                                                           "min_pixels": 3136}))
    cap.setup_prompt()
    hf = _hf_qwen2_5_vl_processor(model_dir)
    seconds = set()
    for path, spec in standard_clips:
        if spec.seconds > 10:
            continue
        item = cap.prepare(str(path))
        ours = cap.model_inputs([item])
        frames = sample_frames(str(path), cap.opts)
        reader = video.open_video(str(path))
        fps = len(frames) * reader.get_avg_fps() / len(reader)  # qwen-vl-utils' sample_fps
        ref = hf(text=[cap.prompt_for_template()], videos=[list(frames)], fps=fps, return_tensors="np")
        np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
        np.testing.assert_allclose(ours["pixel_values_videos"], ref["pixel_values_videos"], rtol=0, atol=2e-5)
        np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
        np.testing.assert_allclose(ours["second_per_grid_ts"], np.asarray(ref["second_per_grid_ts"]), rtol=1e-6)
        seconds.add(round(float(ours["second_per_grid_ts"][0]), 3))
    assert len(seconds) >= 2, seconds  # clips of different rates: not one constant
