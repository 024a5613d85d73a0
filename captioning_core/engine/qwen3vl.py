"""The compiled Qwen3-VL engine: ``CompiledQwen2VL``'s buckets, sessions and greedy loop with Qwen3-VL's cells.

What it overrides: the checkpoint (``qwen3vl_text`` / ``qwen3vl_vision``), the interleaved M-RoPE angles, the
rope index (every temporal group of a video is its own timestamped vision run, so the grids are split per
group, as transformers' ``get_rope_index`` does), and the vision inputs of prefill (the tower's DeepStack
features travel with its merged tokens). ``generate`` and ``prefill`` are the base class's.
"""

from __future__ import annotations

import functools

import numpy as np

from captioning_core.engine import rope
from captioning_core.engine.checkpoint import Loader
from captioning_core.engine.qwen2vl import CompiledQwen2VL


class CompiledQwen3VL(CompiledQwen2VL):
    """Qwen3-VL as compiled MindSpore graphs (one generate at a time)."""

    model_types = ("qwen3_vl",)

    def _load(self, raw: dict, load: Loader) -> None:
        from captioning_core.engine import qwen3vl_vision
        from captioning_core.engine.qwen3vl_text import TextConfig, TextWeights

        self.text_cfg = TextConfig(raw["text_config"], bool(raw.get("tie_word_embeddings", False)))
        self.windowed = False
        self.vision_cfg = qwen3vl_vision.VisionConfig(raw["vision_config"])
        self.tokens = rope.VisionTokens(int(raw.get("vision_start_token_id", 151652)),
                                        int(raw.get("image_token_id", 151655)),
                                        int(raw.get("video_token_id", 151656)), self.vision_cfg.merge)
        self.weights = TextWeights(load, self.text_cfg)
        self.vision = qwen3vl_vision.VisionTower(self.vision_cfg, load)

    def _cells(self) -> tuple:
        from captioning_core.engine import qwen2vl_text, qwen3vl_text

        prefill = functools.partial(qwen3vl_text.Prefill, deepstack=len(self.vision_cfg.deepstack))
        return qwen3vl_text.Layer, prefill, qwen2vl_text.Step

    def _angles(self, positions: np.ndarray) -> np.ndarray:
        inv = self.text_cfg.inv_freq()
        return rope.axis_positions(positions, rope.interleaved_axes(self.text_cfg.mrope_section, len(inv))) * inv

    def rope_index(self, input_ids: np.ndarray, attention_mask: np.ndarray, video_grid_thw: np.ndarray | None,
                   second_per_grid_ts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """transformers' Qwen3-VL ``get_rope_index`` in numpy: position ids [3, B, L] and deltas [B]."""
        return rope.mrope_positions(np.asarray(input_ids), np.asarray(attention_mask), self.tokens,
                                    rope.split_video_grids(video_grid_thw))

    def vision_features(self, pixel_values: np.ndarray, grid_thw: np.ndarray):
        """((merged [G*S/4, D], DeepStack [K, G*S/4, D]) device Tensors, rows of each merged token)."""
        from mindspore import Tensor

        from captioning_core.engine import qwen3vl_vision

        grid = np.asarray(grid_thw).reshape(-1, 3)
        groups = self.buckets.groups(int(grid[:, 0].sum()))
        size = self.buckets.patches(int((grid[:, 1] * grid[:, 2]).max()))
        pix, ang, valid, pidx, pw, rows = qwen3vl_vision.pack(np.asarray(pixel_values, np.float32), grid,
                                                              self.vision_cfg, groups, size)
        out = self._timed(("vision", groups, size), self._vision_fn, Tensor(pix), Tensor(ang), Tensor(valid),
                          Tensor(pidx), Tensor(pw))
        return out, rows

    def vision_numpy(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        (merged, _), rows = self.vision_features(pixel_values, grid_thw)
        return merged.asnumpy()[rows].astype(np.float32)

    def deepstack_numpy(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        """[K, n, D]: the DeepStack features as transformers' ``visual`` returns them (its second output)."""
        (_, stacked), rows = self.vision_features(pixel_values, grid_thw)
        return stacked.asnumpy()[:, rows].astype(np.float32)

    def _vision_inputs(self, arrays: dict, pids: np.ndarray) -> tuple:
        from mindspore import Tensor

        feats, vision_rows, is_video = self._place_vision(arrays, pids)
        if feats is None:
            hidden, k = self.text_cfg.hidden, max(1, len(self.vision_cfg.deepstack))
            feats = (Tensor(np.zeros((1, hidden), np.float32)), Tensor(np.zeros((k, 1, hidden), np.float32)))
        return feats[0], feats[1], Tensor(vision_rows), Tensor(is_video)
