"""A small deterministic captioner that really decodes each clip and names its shape's colour.

The runner tests and the S3 drills run the real ``RankRunner`` on real clips in seconds with it: each row must
get the caption of its own video, with no VLM to load. The real models are exercised under msrun
(tests/test_caption_msrun.py).
"""

from __future__ import annotations

from types import SimpleNamespace

from captioning_core.config import RunConfig
from captioning_core.models.base import Captioner
from captioning_core.models.qwen2_vl import sample_frames
from testkit.clips import COLORS
from testkit.partition import Row
from testkit.profile import TINY

WORDS = list(COLORS)


class ColourCaptioner(Captioner):
    """Names the colour of the brightest pixels; token ids are indices into WORDS."""

    name = "colour"
    generate_calls: list[int] = []

    def prepare(self, local_path: str) -> SimpleNamespace:
        frames = sample_frames(local_path, TINY.qwen2vl_options())
        lit = frames.reshape(-1, 3)[frames.reshape(-1, 3).max(axis=1) > 128].astype(int)
        rgb = tuple(int(v > 128) for v in lit.mean(axis=0))
        colour = {(1, 0, 0): 0, (0, 1, 0): 1, (0, 0, 1): 2, (1, 1, 0): 3}[rgb]
        return SimpleNamespace(colour=colour, thumb_frames=frames)

    def setup(self) -> None:
        self.tokenizer = None

    def generate(self, batch: list) -> list[list[int]]:
        ColourCaptioner.generate_calls.append(len(batch))
        return [[item.colour] for item in batch]

    def decode(self, token_ids: list[int]) -> str:
        return WORDS[token_ids[0]]


def colour_config(meta: str, **kw) -> RunConfig:
    """A ``RunConfig`` for ColourCaptioner on ``meta``; one journal part per batch, so crash points are exact."""
    kw.setdefault("journal_flush_rows", 1)
    return RunConfig(meta_path=meta, model="colour", pretrained_model_name_or_path="unused", device_target="CPU",
                     log_every=0, **kw)


def expected_statuses(rows: list[Row]) -> list[tuple[str, str]]:
    """(caption_status, text) ColourCaptioner gives each row: its colour, or failed with no text."""
    return [("ok", r.spec.color) if r.spec else ("failed", "") for r in rows]
