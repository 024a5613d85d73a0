"""The one small-video profile the tiny models are trained and tested with, in every shape a caller needs.

Tests, the testkit and the demo all caption with the tiny models on a CPU at 112x112, 2 fps and a 3136-pixel
floor; spelling those four numbers once keeps every CLI argv, operator option dict and ``Qwen2VLOptions`` the
same profile, so changing it (or finding who uses it) is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captioning_core.models.qwen2_vl import Qwen2VLOptions


@dataclass(frozen=True)
class Profile:
    """Frame size, sampling rate and pixel floor of a Qwen2-VL-family run."""

    width: int
    height: int
    fps: float
    min_pixels: int

    def args(self) -> list[str]:
        """The caption scripts' argv fragment (``--height 112 --width 112 --fps 2 --min_pixels 3136``)."""
        return ["--height", str(self.height), "--width", str(self.width), "--fps", f"{self.fps:g}",
                "--min_pixels", str(self.min_pixels)]

    def model_options(self) -> dict[str, Any]:
        """``RunConfig.model_options`` for a Qwen2-VL-family captioner (fps as the float the parser makes)."""
        return {"height": self.height, "width": self.width, "fps": float(self.fps), "min_pixels": self.min_pixels}

    def caption_options(self, **extra: Any) -> dict[str, Any]:
        """The operator's ``caption_options`` size entries, as a user writes them, plus ``extra``."""
        return {"height": self.height, "width": self.width, "fps": self.fps, "min_pixels": self.min_pixels, **extra}

    def qwen2vl_options(self, **overrides: Any) -> Qwen2VLOptions:
        """``Qwen2VLOptions`` of this profile (``overrides`` e.g. ``max_video_tokens=...`` or another fps)."""
        from captioning_core.models.qwen2_vl import Qwen2VLOptions

        fields = {"height": self.height, "width": self.width, "fps": self.fps, "min_pixels": self.min_pixels}
        return Qwen2VLOptions(**{**fields, **overrides})


TINY = Profile(width=112, height=112, fps=2, min_pixels=3136)
# The caption scripts' CPU argv for the tiny Qwen2-VL under msrun: the profile, short captions, quiet progress.
TINY_ARGS = ["--device_target", "CPU", *TINY.args(), "--max_new_tokens", "12", "--log_every", "0"]
