"""``--engine compiled`` through the caption script: the tiny Qwen2-VL and Qwen3-VL caption the same clips (real decord,
local files, one process) with the same captions as ``--engine eager``, which is what lets the engine be a
speed-only option (left out of the fingerprint); and a model without a compiled engine refuses the option
before it loads anything, instead of running eagerly in its place.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioning_core import fingerprint
from captioning_core.arguments import build_parser, config_from_args
from testkit.clips import ensure_clip
from testkit.demo_clips import PARTITION_SPECS
from testkit.partition import Row, meta_csv

REPO = Path(__file__).resolve().parents[1]
SPECS = PARTITION_SPECS[:8]  # 240p to 720p, portrait and landscape, 1-3 s, 24-30 fps
TINY = ["--height", "112", "--width", "112", "--fps", "2", "--min_pixels", "3136"]
# what each tiny model was trained with (Qwen3-VL: its checkpoint's video processor settings, the defaults)
MODEL_ARGS = {"qwen2vl": TINY, "qwen3vl": []}


def _caption(model: str, meta: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    return subprocess.run(
        [sys.executable, "-m", "captioning_core.caption", model, str(meta), "--pretrained_model_name_or_path",
         str(REPO / "tiny_models" / model), "--device_target", "CPU", "--max_new_tokens", "12",
         "--output", str(out), *args],
        env=env, capture_output=True, text=True, timeout=900)


def _rows(out: Path) -> list[dict]:
    with open(out, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.integration
@pytest.mark.parametrize("model", ["qwen2vl", "qwen3vl"])
def test_compiled_captions_equal_eager_captions(model, clip_dir, tmp_path):
    rows = [Row(str(ensure_clip(spec, clip_dir)), spec) for spec in SPECS]
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv(rows))
    results = {}
    for engine in ("eager", "compiled"):
        out = tmp_path / f"{engine}.csv"
        proc = _caption(model, meta, out, "--engine", engine, *MODEL_ARGS[model])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[engine] = _rows(out)
    eager, compiled = results["eager"], results["compiled"]
    assert [r["caption_status"] for r in compiled] == ["ok"] * len(SPECS)
    assert [r["text"] for r in eager] == [spec.caption for spec in SPECS]  # the tiny model gets each one right
    assert [r["text"] for r in compiled] == [r["text"] for r in eager]
    summaries = {e: json.loads((tmp_path / f"{e}.csv.summary.json").read_text()) for e in results}
    assert summaries["compiled"]["fingerprint"] == summaries["eager"]["fingerprint"]
    stats = summaries["compiled"]["ranks"][0]
    assert stats["output_tokens"] == summaries["eager"]["ranks"][0]["output_tokens"], stats


@pytest.mark.parametrize("model", ["pllava"])
def test_a_model_without_a_compiled_engine_refuses_it(model, tmp_path):
    parser = build_parser(model)
    with pytest.raises(ValueError, match=f"{model} has no compiled engine"):
        config_from_args(model, parser.parse_args(["m.csv", "--engine", "compiled"]))
    config_from_args(model, parser.parse_args(["m.csv", "--engine", "eager"]))
    meta = tmp_path / "meta.csv"
    meta.write_text("path\nmissing.mp4\n")
    proc = _caption(model, meta, tmp_path / "out.csv", "--engine", "compiled")
    assert proc.returncode != 0
    assert f"--engine compiled: {model} has no compiled engine" in proc.stderr
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("model", ["qwen2vl", "qwen3vl"])
def test_the_engine_is_speed_only(model):
    parser = build_parser(model)
    fps = [fingerprint.compute(config_from_args(model, parser.parse_args(["m.csv", "--engine", e])))
           for e in ("eager", "compiled")]
    assert fps[0] == fps[1]
    assert config_from_args(model, parser.parse_args(["m.csv"])).engine == "eager"  # the default, for now
