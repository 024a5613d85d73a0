"""Where the repository and its tiny models are, for tests and the testkit (one place, not one per module)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODELS = REPO / "tiny_models"
TINY_QWEN2VL = TINY_MODELS / "qwen2vl"
