"""The caption CLI: every seed argument is listed, and every argument it accepts reaches the run config."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from captioning_core import options_doc
from captioning_core.cli import build_parser, config_from_args
from captioning_core.config import RunConfig
from captioning_core.models import CAPTIONERS, captioner_class
from testkit.option_values import CHANGED

SEED_ARGS = ["--pretrained_model_name_or_path", "--question", "--max_new_tokens", "--height", "--width", "--fps",
             "--bs", "--skip_if_existing", "--output", "--device_target", "--gather", "--pad_length"]


def test_help_lists_the_seed_arguments():
    out = subprocess.run([sys.executable, "-m", "captioning_core.caption_qwen2vl", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for arg in SEED_ARGS:
        assert arg in out.stdout, arg
    assert "S3" not in out.stdout or "AWS_SECRET_ACCESS_KEY" not in out.stdout.split("--")[0]


@pytest.mark.parametrize("model", ["qwen2vl", "qwen2_5vl"])
def test_every_option_reaches_the_config(model):
    parser = build_parser(model)
    base = config_from_args(model, parser.parse_args(["s3://b/meta.csv"]))
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if action.dest == "skip_if_existing":
            argv = ["s3://b/meta.csv", "--skip_if_existing"]
        else:
            assert action.dest in CHANGED, f"add a changed value for --{action.dest}"
            argv = ["s3://b/meta.csv", action.option_strings[0], CHANGED[action.dest]]
        cfg = config_from_args(model, parser.parse_args(argv))
        assert cfg != base, f"--{action.dest} does not change the run config"


def test_bad_values_fail_loudly():
    parser = build_parser("qwen2vl")
    for argv in (["m.csv", "--bs", "0"], ["m.csv", "--device_target", "GPU"], ["m.csv", "--fps", "0"],
                 ["m.csv", "--height", "10"]):
        with pytest.raises((SystemExit, ValueError)):
            config_from_args("qwen2vl", parser.parse_args(argv))


@pytest.mark.parametrize("model", sorted(CAPTIONERS))
def test_defaults_come_from_the_dataclasses(model, monkeypatch):
    """No option restates a default: the parser's equal RunConfig's fields and the model's options dataclass."""
    monkeypatch.delenv("CAPTION_DEVICE_TARGET", raising=False)
    cfg = config_from_args(model, build_parser(model).parse_args(["s3://b/meta.csv"]))
    reference = RunConfig(meta_path="s3://b/meta.csv", model=model,
                          pretrained_model_name_or_path=captioner_class(model).default_model_dir)
    assert dataclasses.replace(cfg, model_options={}) == reference
    options_cls = captioner_class(model).options_cls
    assert options_cls is not None
    assert cfg.model_options == dataclasses.asdict(options_cls())


def test_readme_option_tables_are_generated_from_the_parsers():
    assert options_doc.main(["--check"]) == 0, "run: python -m captioning_core.options_doc"
    tables = options_doc.tables()
    assert "| `--fps` | 4.0 | 2.0 |" in tables["qwen2vl+qwen2_5vl"]  # each model's own default, side by side
    with pytest.raises(KeyError, match="lacks options blocks"):
        options_doc.render("no tables here")


def test_docs_carry_no_merge_conflict_markers():
    """A merge once left ``<<<<<<< HEAD`` in the README's layout block; ruff does not read Markdown."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted(root.glob("tiny_models/*/README.md"))]:
        marked = [n for n, line in enumerate(doc.read_text().splitlines(), 1)
                  if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
        assert not marked, f"{doc.relative_to(root)}: conflict markers at lines {marked}"


def test_caption_py_runs_any_registered_model_and_refuses_others():
    ok = subprocess.run([sys.executable, "-m", "captioning_core.caption", "qwen2_5vl", "--help"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "--fps" in ok.stdout and "Qwen2.5-VL-7B-Instruct" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "captioning_core.caption", "qwen9", "m.csv"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "qwen2_5vl" in bad.stderr


def test_an_option_prefix_is_refused_not_expanded():
    """``--out`` must not reach ``--output`` (nor ``--pretrained`` the model dir): owned-option checks go by
    full names, so an abbreviation would slip past them."""
    parser = build_parser("qwen2vl")
    for argv in (["m.csv", "--out=s3://elsewhere/x.csv"], ["m.csv", "--pretrained", "/elsewhere"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
