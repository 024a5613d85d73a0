"""Batched equals unbatched: captions at ``--bs 8``, and with the token-budget default, equal those at ``--bs 1``
on videos of different lengths and sizes.

Qwen2-VL batches videos with different token counts: prompts are left-padded and each row's multimodal rotary
positions must ignore the padding. A batching bug shows up as a caption that changes with its neighbours.
The caption script runs as one process on local files (no msrun: batching is within a rank).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.clips import ensure_clip
from testkit.demo_clips import MIXED_DURATION_SPECS, PARTITION_SPECS
from testkit.partition import Row, meta_csv
from testkit.profile import TINY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SPECS = PARTITION_SPECS[:8]  # 240p to 720p, portrait and landscape, 1-3 s, 24-30 fps
MODEL_ARGS = {
    "qwen2vl": TINY.args(),
    "qwen2_5vl": TINY.args(),
    "qwen3vl": [],  # the checkpoint's video processor settings, which it was trained with
    "pllava": ["--pooling_shape", "4-4-4"],  # what the tiny PLLaVA was trained with
}


def _captions(model: str, meta: Path, bs: int | None, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    proc = subprocess.run(
        [sys.executable, "-m", "captioning_core.caption", model, str(meta), "--pretrained_model_name_or_path",
         str(REPO / "tiny_models" / model), "--device_target", "CPU", "--max_new_tokens", "12",
         *(["--bs", str(bs)] if bs else []), "--output", str(out), *MODEL_ARGS[model]],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("model", ["qwen2vl", "qwen2_5vl", "qwen3vl", "pllava"])
def test_captions_at_bs8_equal_bs1(model, clip_dir, tmp_path):
    rows = [Row(str(ensure_clip(spec, clip_dir)), spec) for spec in SPECS]
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv(rows))
    one = _captions(model, meta, 1, tmp_path / "bs1.csv")
    eight = _captions(model, meta, 8, tmp_path / "bs8.csv")
    assert [r["caption_status"] for r in one] == ["ok"] * len(SPECS)
    assert [r["text"] for r in one] == [spec.caption for spec in SPECS]  # the tiny model gets each one right
    assert [r["text"] for r in eight] == [r["text"] for r in one]


def test_token_budget_default_equals_bs1_on_the_mixed_duration_partition(clip_dir, tmp_path):
    """Every 4th clip of benchmark 9's partition (2-20 s; the benchmark checks all 64 the same way): the default
    batches by token budget, grouping similar lengths in few generate calls; every row's greedy caption must be
    the one it gets alone."""
    rows = [Row(str(ensure_clip(spec, clip_dir)), spec) for spec in MIXED_DURATION_SPECS[::4]]
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv(rows))
    default = _captions("qwen2vl", meta, None, tmp_path / "default.csv")
    one = _captions("qwen2vl", meta, 1, tmp_path / "bs1.csv")
    assert [r["caption_status"] for r in one] == ["ok"] * len(rows)
    assert [r["text"] for r in default] == [r["text"] for r in one]
    summary = json.loads((tmp_path / "default.csv.summary.json").read_text())
    stats = summary["ranks"][0]
    assert stats["generate_calls"] <= len(rows) // 2, stats  # batched: far fewer calls than rows
    assert stats["padding_share"] <= 0.1, stats
