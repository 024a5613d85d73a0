"""Qwen3-VL preprocessing: our numpy path against transformers' own Qwen3-VL functions, on real encoded clips.

transformers' ``Qwen3VLVideoProcessor`` resizes and normalises with torchvision, which is not installed here
(and breaks ``import mindnlp``). So each step is compared with the processor's own code that does run without
it: ``sample_frames`` (indices), ``smart_resize`` (size), ``_preprocess`` with ``do_resize=False`` and
``do_normalize=False`` (rescale and patch layout; the 0.5/0.5 normalisation is then one subtraction and one
division), ``Qwen3VLProcessor._calculate_timestamps`` and the processor's prompt expansion. The resize is
compared with what torchvision's ``resize`` does to a uint8 tensor (bicubic, antialias): real PyTorch's
``interpolate`` on float32, then clamp and round, run in a separate process (mindnlp replaces ``torch``).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from captioning_core import video
from captioning_core.models.qwen3_vl import (
    Qwen3VLOptions,
    VideoProcessorConfig,
    expand_video,
    group_timestamps,
    patchify,
    sample_frames,
    sample_indices,
    target_size,
)

pytestmark = pytest.mark.integration

TINY = VideoProcessorConfig(min_pixels=32 * 32 * 4, max_pixels=128 * 128 * 8)


def _hf_processor(vp: VideoProcessorConfig):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLVideoProcessor(**{k: v for k, v in vp.to_json().items() if k != "video_processor_type"})


def test_defaults_are_transformers_class_defaults():
    hf = _hf_processor(VideoProcessorConfig())
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as cls

    vp = VideoProcessorConfig()
    assert (vp.patch.patch_size, vp.patch.temporal_patch_size, vp.patch.merge_size) == (
        cls.patch_size, cls.temporal_patch_size, cls.merge_size)
    assert list(vp.patch.image_mean) == cls.image_mean and list(vp.patch.image_std) == cls.image_std
    assert (vp.fps, vp.min_frames, vp.max_frames) == (cls.fps, cls.min_frames, cls.max_frames)
    assert (vp.min_pixels, vp.max_pixels) == (cls.size["shortest_edge"], cls.size["longest_edge"])
    assert hf.size["longest_edge"] == vp.max_pixels


@pytest.mark.parametrize("vp", [VideoProcessorConfig(), TINY, VideoProcessorConfig(fps=1.0, min_frames=2, max_frames=6)],
                         ids=["default", "tiny", "fps1-max6"])
def test_frame_indices_match_hf_sample_frames(standard_clips, vp):
    from transformers.video_utils import VideoMetadata

    hf = _hf_processor(vp)
    for path, spec in standard_clips:
        if spec.vfr:
            continue
        reader = video.open_video(str(path))
        meta = VideoMetadata(total_num_frames=len(reader), fps=reader.get_avg_fps(), width=spec.width,
                             height=spec.height, duration=len(reader) / reader.get_avg_fps())
        assert sample_indices(reader, vp) == hf.sample_frames(meta).tolist(), spec


def test_target_size_matches_hf_smart_resize():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    for vp, n, (h, w) in itertools.product(
            [VideoProcessorConfig(), TINY], [2, 3, 4, 7, 16, 61, 768],
            [(240, 320), (360, 640), (720, 1280), (1080, 1920), (1920, 1080), (288, 352), (64, 3000), (33, 40)]):
        ref = smart_resize(n, h, w, temporal_factor=2, factor=32, min_pixels=vp.min_pixels,
                           max_pixels=vp.max_pixels)
        assert target_size(n, h, w, vp) == ref, (vp, n, h, w)


@pytest.mark.parametrize("vp", [VideoProcessorConfig(), TINY], ids=["default", "tiny"])
def test_patches_match_hf_video_processor(standard_clips, vp):
    import torch
    from transformers.image_utils import SizeDict

    hf = _hf_processor(vp)
    checked = 0
    for path, spec in standard_clips:
        if spec.seconds > 10:
            continue  # long clips cover sampling, not layout
        frames, _ = sample_frames(str(path), vp)
        ours, grid = patchify(frames, vp.patch)
        ref = hf._preprocess([torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()], do_resize=False,
                             size=SizeDict(shortest_edge=vp.min_pixels, longest_edge=vp.max_pixels),
                             do_rescale=True, rescale_factor=1 / 255, do_normalize=False, image_mean=None,
                             image_std=None, patch_size=16, temporal_patch_size=2, merge_size=2,
                             return_tensors="np")
        assert tuple(ref["video_grid_thw"][0]) == grid
        mean, std = vp.patch.image_mean[0], vp.patch.image_std[0]
        np.testing.assert_allclose(ours, (ref["pixel_values_videos"] - mean) / std, rtol=0, atol=2e-6)
        checked += 1
    assert checked >= 3


def test_timestamps_match_hf_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    for indices, fps in [([0, 16, 33, 49], 25.0), ([0, 12, 24, 36, 48], 24.0), ([0], 30.0),
                         (list(range(0, 300, 15)), 29.97)]:
        assert group_timestamps(indices, fps) == tuple(
            Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2))


def test_prompt_matches_hf_processor_expansion(monkeypatch):
    """The processor's own text expansion, fed our grid and frame indices (its video processor stands aside:
    it needs torchvision; and it accepts our tiny word-level tokenizer in place of a Qwen2 BPE one)."""
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    from tools.tiny_vocab import qwen3_tokenizer

    # class checks only (they want a Qwen2 BPE tokenizer, and resolve the video processor class to
    # torchvision's placeholder here)
    monkeypatch.setattr(Qwen3VLProcessor, "check_argument_for_proper_class", lambda self, name, arg: arg)
    tok = qwen3_tokenizer()
    proc = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                            video_processor=_hf_processor(TINY))
    grid, indices, fps = (3, 4, 6), [0, 16, 33, 49, 66], 25.0

    class Grids:  # what the video processor would return for a 5-frame, 128x192 video
        merge_size = 2

        def __call__(self, videos, **kwargs):
            meta = VideoMetadata(total_num_frames=67, fps=fps, frames_indices=indices)
            return BatchFeature({"video_grid_thw": np.asarray([grid]), "video_metadata": [meta]})

    proc.video_processor = Grids()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video"}]}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = proc(text=[prompt], videos=["unused"], return_tensors="np")
    ours = tok([expand_video(prompt, grid, group_timestamps(indices, fps))], return_tensors="np")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert "<0.3 seconds>" in expand_video(prompt, grid, group_timestamps(indices, fps))


def test_token_cap_and_per_frame_cap(standard_clips):
    for path, spec in standard_clips:
        frames, stamps = sample_frames(str(path), VideoProcessorConfig(), Qwen3VLOptions(max_video_tokens=40))
        _, grid = patchify(frames, VideoProcessorConfig().patch)
        assert grid[0] * grid[1] * grid[2] // 4 <= 40 or grid[0] == 1, spec  # one group is the floor
        assert len(stamps) == grid[0]
        frames, _ = sample_frames(str(path), VideoProcessorConfig(), Qwen3VLOptions(height=128, width=128))
        assert frames.shape[1] * frames.shape[2] <= 128 * 128 and frames.shape[1] % 32 == 0, spec


def test_cli_defaults_come_from_the_checkpoint_and_options_override_them():
    from pathlib import Path

    from captioning_core import arguments, cli
    from captioning_core.models.qwen3_vl import Qwen3VLCaptioner

    tiny = str(Path(__file__).resolve().parents[1] / "tiny_models" / "qwen3vl")
    args = cli.build_parser("qwen3vl").parse_args(["m.csv", "--pretrained_model_name_or_path", tiny])
    cap = Qwen3VLCaptioner(cli.config_from_args("qwen3vl", args))
    assert cap.vp == VideoProcessorConfig.from_model_dir(tiny)
    assert (cap.vp.min_pixels, cap.vp.max_pixels, cap.vp.patch.patch_size) == (4096, 128 * 128 * 8, 16)
    assert cap.opts.max_video_tokens == 4096 - 200 - 256  # from the model's context
    args = cli.build_parser("qwen3vl").parse_args(["m.csv", "--pretrained_model_name_or_path", tiny, "--fps", "1",
                                                   "--max_pixels", "99999"])
    cap = Qwen3VLCaptioner(cli.config_from_args("qwen3vl", args))
    assert (cap.vp.fps, cap.vp.max_pixels, cap.vp.min_frames) == (1.0, 99999, 4)
    assert arguments.for_script_args("qwen3vl", ["m.csv", "--fps", "1"])["id"] != \
        arguments.for_script_args("qwen3vl", ["m.csv", "--fps", "2"])["id"]
    with pytest.raises(ValueError, match="go together"):
        Qwen3VLOptions(height=128)
    with pytest.raises(ValueError, match="min_pixels"):
        Qwen3VLOptions(min_pixels=10, max_pixels=5)


def test_one_frame_video_makes_one_temporal_group(broken_clips):
    frames, stamps = sample_frames(str(broken_clips["one_frame"]), TINY)
    _, grid = patchify(frames, TINY.patch)
    assert frames.shape[0] == 1 and grid[0] == 1 and stamps == (0.0,)


@pytest.mark.parametrize("kind", ["zero_byte", "truncated", "garbage", "audio_only", "not_video", "no_frames"])
def test_broken_clips_raise_video_error(broken_clips, kind):
    with pytest.raises(video.VideoError):
        sample_frames(str(broken_clips[kind]), TINY)


_TORCH_RESIZE = """
import sys, numpy as np, torch
data = np.load(sys.argv[1])
out = {}
for key in [k for k in data.files if k.endswith("-raw")]:
    raw, (h, w) = data[key], data[key[:-4] + "-ours"].shape[1:3]
    key = key[:-4]
    ref = torch.nn.functional.interpolate(torch.from_numpy(raw).permute(0, 3, 1, 2).float(), size=(h, w),
                                          mode="bicubic", antialias=True, align_corners=False)
    out[key] = ref.clamp_(0, 255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
np.savez(sys.argv[2], **out)
"""


def test_resize_matches_torchvision_bicubic_antialias(standard_clips, tmp_path):
    """``sample_frames`` resizes as the HF video processor does (torchvision on uint8): equal but for float
    rounding ties (at most 1 grey level, on at most 1 value in 10^4; measured: 0 of 2,076,672 values here, 1
    of 294,912 on four partition clips). PIL's bicubic, used before, was 7 levels off here."""
    import subprocess
    import sys

    pairs = {}
    for number, (path, spec) in enumerate(standard_clips):
        if spec.seconds > 10 or spec.vfr:
            continue
        reader = video.open_video(str(path))
        raw = video.read_frames(reader, sample_indices(reader, TINY))
        ours, _ = sample_frames(str(path), TINY)
        if ours.shape[1:3] != raw.shape[1:3]:
            pairs[f"clip{number}"] = (raw, ours)
    assert len(pairs) >= 3
    arrays = {f"{key}-{part}": array for key, (raw, ours) in pairs.items() for part, array in (("raw", raw), ("ours", ours))}
    np.savez(tmp_path / "in.npz", **arrays)
    proc = subprocess.run([sys.executable, "-c", _TORCH_RESIZE, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = np.load(tmp_path / "out.npz")
    values = off = 0
    for key, (_, ours) in pairs.items():
        diff = np.abs(ref[key].astype(int) - ours.astype(int))
        assert diff.max() <= 1, f"{key}: {diff.max()} grey levels off"
        values, off = values + diff.size, off + int((diff > 0).sum())
    assert off <= values / 10**4, f"{off} of {values} values differ"
