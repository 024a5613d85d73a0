"""PLLaVA captioner pieces without a model: arguments, pooling shape, frame indices, prompts, cleanup,
pooling arithmetic and seeded sampling (the last two under real PyTorch in this process)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from captioning_core import video
from captioning_core.cli import build_parser, config_from_args
from captioning_core.models.pllava import (
    CONV_TEMPLATES,
    DEMO_SYSTEM,
    SYSTEM_RECAPTION,
    PllavaOptions,
    parse_pooling_shape,
    preresize_size,
)


@pytest.mark.parametrize("text", ["16-12-12", "(16,12,12)", "16,12,12", "(16, 12, 12)", "[16,12,12]", "16x12x12",
                                  " 16 - 12 - 12 ", (16, 12, 12), [16, 12, 12]])
def test_pooling_shape_forms(text):
    assert parse_pooling_shape(text) == (16, 12, 12)


@pytest.mark.parametrize("text", ["16-12", "16-12-12-1", "0-12-12", "a-b-c", "", "16.5-12-12"])
def test_bad_pooling_shapes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_pooling_shape(text)


def test_seed_arguments_and_defaults():
    parser = build_parser("pllava")
    args = parser.parse_args(["meta.csv"])
    assert (args.num_frames, args.pooling_shape, args.num_beams, args.temperature) == (4, (16, 12, 12), 1, 1.0)
    assert (args.use_lora, args.weight_dir, args.conv_mode) == (False, None, "plain")
    assert (args.max_new_tokens, args.pad_length, args.bs, args.skip_if_existing) == (200, 4096, None, False)
    assert args.pretrained_model_name_or_path == "./pretrained_models/pllava"
    cfg = config_from_args("pllava", parser.parse_args(
        ["m.csv", "--pooling_shape", "(4,12,12)", "--num_frames", "8", "--use_lora", "--weight_dir", "/w",
         "--lora_alpha", "4", "--conv_mode", "eval_recaption", "--num_beams", "2", "--seed", "3"]))
    opts = PllavaOptions(**cfg.model_options)
    assert opts == PllavaOptions(8, (4, 12, 12), True, "/w", 4, "eval_recaption", 2, 1.0, 3)
    assert cfg.output == "m_caption_pllava.csv"


PLLAVA_CHANGED = {"num_frames": "8", "pooling_shape": "4-12-12", "use_lora": None, "weight_dir": "/w",
                  "lora_alpha": "4", "conv_mode": "eval_recaption", "num_beams": "3", "temperature": "0.7",
                  "seed": "7"}


def test_every_pllava_option_reaches_the_config():
    parser = build_parser("pllava")
    base = config_from_args("pllava", parser.parse_args(["m.csv"]))
    added = {a.dest for a in parser._actions} - {a.dest for a in build_parser("qwen2vl")._actions}
    assert added == set(PLLAVA_CHANGED)  # every model-specific option is checked below
    for dest, value in PLLAVA_CHANGED.items():
        argv = ["m.csv", f"--{dest}"] + ([] if value is None else [value])
        cfg = config_from_args("pllava", parser.parse_args(argv))
        assert cfg.model_options != base.model_options, dest


@pytest.mark.parametrize("argv", [["--temperature", "0.7", "--num_beams", "2"], ["--num_frames", "0"],
                                  ["--num_beams", "0"], ["--temperature", "0"], ["--conv_mode", "chat"],
                                  ["--pooling_shape", "4-4"], ["--lora_alpha", "-1"]])
def test_bad_options_fail_before_launch(argv):
    parser = build_parser("pllava")
    with pytest.raises((SystemExit, ValueError)):
        config_from_args("pllava", parser.parse_args(["m.csv", *argv]))


def test_segment_centre_indices():
    # MODELS.md A.4.1 worked examples (ChatPllava.get_index)
    assert video.pllava_frame_indices(150, 4) == [18, 55, 92, 130]
    assert video.pllava_frame_indices(150, 16) == [4, 13, 23, 32, 41, 51, 60, 69, 78, 88, 97, 106, 116, 125,
                                                   134, 144]
    assert video.pllava_frame_indices(10, 16) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8, 8]  # repeats
    assert video.pllava_frame_indices(1, 4) == [0, 0, 0, 0]
    for total in range(1, 400, 7):
        for segments in (1, 4, 8, 16):
            idx = video.pllava_frame_indices(total, segments)
            seg = (total - 1) / segments
            assert idx == [int(seg / 2) + int(np.round(seg * k)) for k in range(segments)]
            assert len(idx) == segments and idx == sorted(idx) and 0 <= idx[0] and idx[-1] <= total - 1


def test_prompts_follow_pllavas_templates():
    q = "Describe the video in details"
    # the seed's ChatPllava flow (demo system, video uploaded first), MODELS.md A.4.3 computed prompt
    assert CONV_TEMPLATES["plain"].prompt(q) == DEMO_SYSTEM + " USER:<image>  USER:" + q + " ASSISTANT:"
    assert CONV_TEMPLATES["eval_recaption"].prompt(q) == (
        SYSTEM_RECAPTION + " " + "USER: <image>\n USER: " + q + " ASSISTANT:")
    assert CONV_TEMPLATES["eval_videoqabench"].prompt(q) == (
        "USER: <image>\n The input consists of a sequence of key frames from a video. Answer the question "
        "concisely first and followed by significant events, characters, or objects that appear throughout the "
        "frames. Question: " + q + " \n ASSISTANT:\nAnswer: In the video,")
    assert CONV_TEMPLATES["eval_recaption_llavanext"].prompt(q) == (
        SYSTEM_RECAPTION + "<|im_end|>\n<|im_start|>user\n<image>\n<|im_end|>\n<|im_start|>user\n" + q
        + "<|im_end|>\n<|im_start|>assistant\n")
    for template in CONV_TEMPLATES.values():
        assert template.prompt(q).count("<image>") == 1
    assert DEMO_SYSTEM.splitlines()[0].endswith("assistant. ") and DEMO_SYSTEM.endswith("yourself.\n")


def test_answer_cleanup_like_pllava_answer():
    plain = CONV_TEMPLATES["plain"]
    assert plain.clean(" a red square moves left</s>") == "a red square moves left"
    assert plain.clean("USER: x ASSISTANT: a dog runs ASSISTANT: it moves</s>") == "it moves"
    assert plain.clean("the bus moves") == "the bus moves"  # a suffix, not rstrip's character set
    nxt = CONV_TEMPLATES["eval_recaption_llavanext"]
    assert nxt.clean("<|im_start|> assistant\nA cat.<|im_end|>\n") == "A cat."


def test_preresize_like_pllava_processor():
    assert preresize_size(1080, 1920, 336) == (360, 640)  # MODELS.md A.4.2 worked example
    assert preresize_size(1920, 1080, 336) == (640, 360)
    assert preresize_size(240, 320, 112) == (240, 320)  # short side kept
    assert preresize_size(240, 320, 336) == (336, 448)  # never below the CLIP resolution
    assert preresize_size(720, 1280, 112) == (360, 640)


@pytest.mark.parametrize(("size", "out"), [((4, 24, 24), (16, 12, 12)), ((16, 24, 24), (16, 12, 12)),
                                           ((4, 24, 24), (4, 12, 12)), ((5, 7, 9), (3, 4, 5)),
                                           ((4, 8, 8), (4, 4, 4)), ((2, 3, 3), (7, 5, 1))])
def test_pooling_equals_torch_adaptive_avg_pool3d(size, out):
    import torch

    from captioning_core.models.pllava_arch import adaptive_avg_pool3d

    x = torch.randn(2, 6, *size)
    torch.testing.assert_close(adaptive_avg_pool3d(x, out), torch.nn.AdaptiveAvgPool3d(out)(x), rtol=0, atol=1e-5)


def test_seeded_sampling_is_reproducible_and_follows_temperature():
    import torch

    from captioning_core.models.pllava_arch import SeededSampling

    logits = torch.tensor([[4.0, 3.0, 2.0, 0.0, -1.0]] * 200)

    def draws(temperature, top_p=1.0, seed=0):
        scores = SeededSampling(temperature, top_p, seed)(None, logits)
        assert torch.isinf(scores).sum() == scores.numel() - scores.shape[0]  # one finite score per row
        return scores.argmax(-1).tolist()

    assert draws(1.5) == draws(1.5) and draws(1.5) != draws(1.5, seed=1)
    assert set(draws(0.05)) == {0}  # cold: the arg-max
    hot = np.bincount(draws(50.0), minlength=5)
    assert (hot > 20).all()  # hot: close to uniform
    assert set(draws(1.0, top_p=0.5)) == {0}  # p(0)=0.64 already covers the nucleus
    assert set(draws(1.0, top_p=0.9)) == {0, 1, 2}
