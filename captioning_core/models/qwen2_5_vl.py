"""Qwen2.5-VL (3B/7B/32B/72B-Instruct, fine-tunes such as SkyCaptioner-V1, or the project's tiny model).

Preprocessing, prompt and batching are Qwen2-VL's (the same image processor: 14-px patches, 2x2 merge,
temporal patch 2, CLIP mean/std). What Qwen2.5-VL adds is absolute time: its multimodal rotary positions
space a video's temporal groups by ``second_per_grid_ts * tokens_per_second``, so each video carries the
seconds one temporal group spans (``temporal_patch_size / sample_fps``), computed the way the Hugging Face
processor does from qwen-vl-utils' sampling rate.

Known upstream behaviour, kept for parity with the reference: transformers 4.57.1 casts ``second_per_grid_t``
to the integer dtype of its position range before multiplying (``get_rope_index``), so a video sampled faster
than ``temporal_patch_size`` frames per second gets every temporal group at the same position. Sampling at
the default 2 fps keeps it at 1 s per group for clips whose rate divides evenly. Under mindnlp that cast only
happens with ``runtime``'s dtype fix for mindtorch's ``as_tensor`` (without it a 0.5 s group counted as 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from captioning_core.models.qwen2_vl import PreparedVideo, Qwen2VLCaptioner, Qwen2VLOptions
from captioning_core.options import inherit


@dataclass(frozen=True)
class Qwen2_5VLOptions(Qwen2VLOptions):  # noqa: N801 - the model's own name
    fps: float = inherit(Qwen2VLOptions, "fps", 2.0)  # qwen-vl-utils' FPS, which its time encoding was tuned with


class Qwen2_5VLCaptioner(Qwen2VLCaptioner):  # noqa: N801 - the model's own name
    name = "qwen2_5vl"
    default_model_dir = "pretrained_models/Qwen2.5-VL-7B-Instruct"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    options_cls = Qwen2_5VLOptions

    def seconds_per_grid(self, item: PreparedVideo) -> float:
        """Seconds of video one temporal group covers, as ``Qwen2_5_VLProcessor`` computes it from the fps."""
        return self.patch.temporal_patch_size / (item.sample_fps or self.opts.fps)

    def model_inputs(self, batch: list[PreparedVideo]) -> dict[str, np.ndarray]:
        arrays = super().model_inputs(batch)
        arrays["second_per_grid_ts"] = np.asarray([self.seconds_per_grid(b) for b in batch], dtype=np.float32)
        return arrays
