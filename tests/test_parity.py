"""Reference parity: what mindnlp computes on MindSpore CPU equals what the reference computes on real PyTorch.

Same tiny weights, same preprocessed inputs (the production ``prepare`` output, saved by the mindnlp side and
read by the reference side), fp32. Each side runs in its own process (testkit/parity.py) because mindnlp
replaces ``torch`` in the process that imports it. Measured here: max |logit difference| 1.4e-5 (Qwen2-VL),
2.9e-5 (Qwen2.5-VL), 2.1e-5 (Qwen3-VL) and 5.7e-5 (PLLaVA) on logits up to ~28; the bound leaves room for other
CPUs' kernels, not for a wrong op.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testkit.clips import ensure_clip
from testkit.demo_clips import DAG_SPECS
from testkit.parity import STEPS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
LOGIT_BOUND = 1e-3  # fp32, max absolute difference over every position and vocabulary entry


def _side(backend: str, model: str, clip: Path, workdir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    proc = subprocess.run([sys.executable, "-m", "testkit.parity", backend, model,
                           str(REPO / "tiny_models" / model), str(clip), str(workdir)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{backend} side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("model", ["qwen2vl", "qwen2_5vl", "qwen3vl", "pllava"])
def test_logits_within_1e_3_and_32_greedy_tokens_equal_the_reference(model, clip_dir, tmp_path):
    clip = ensure_clip(DAG_SPECS[0], clip_dir)
    _side("mindnlp", model, clip, tmp_path)
    _side("torch", model, clip, tmp_path)
    mine, ref = np.load(tmp_path / "mindnlp.npz"), np.load(tmp_path / "torch.npz")

    assert mine["logits"].shape == ref["logits"].shape
    diff = float(np.abs(mine["logits"] - ref["logits"]).max())
    assert diff <= LOGIT_BOUND, f"{model}: max |logit diff| {diff:.2e} > bound {LOGIT_BOUND:.0e}"
    assert mine["ids"].shape == (1, STEPS)
    assert mine["ids"].tolist() == ref["ids"].tolist(), f"{model}: greedy tokens differ (max logit diff {diff:.2e})"
