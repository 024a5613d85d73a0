"""Qwen3-VL's language model: Qwen2-VL's cells (``qwen2vl_text``: static KV cache, prefill and decode graphs)
with what Qwen3-VL changes.

- Attention: RMSNorm over each head's q and k (``q_norm``/``k_norm``, before the rotary), an optional bias on
  q/k/v and o (``attention_bias``), an explicit ``head_dim``.
- M-RoPE is interleaved across the frequencies (``rope.interleaved_axes``); the angles are made on the host,
  so the graphs do not change. In decode all three ids are equal, so the decode graph is Qwen2-VL's.
- DeepStack: the vision tower also returns features from some of its blocks (``deepstack_visual_indexes``);
  in prefill, after decoder layer ``i`` (for ``i`` below their count) the i-th of them is added to the hidden
  states at the video positions, as transformers' ``_deepstack_process``. Decode steps see no video tokens.
"""

from __future__ import annotations

import numpy as np
from mindspore import ops

from captioning_core.engine import layers, qwen2vl_text


class TextConfig(qwen2vl_text.TextConfig):
    def __init__(self, raw: dict, tie_word_embeddings: bool = False) -> None:
        super().__init__(raw, tie_word_embeddings)
        self.attention_bias = bool(raw.get("attention_bias", False))
        scaling = raw.get("rope_scaling") or {}
        if scaling.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {scaling.get('rope_type')!r}: only the default rotary is implemented")


class TextWeights(qwen2vl_text.TextWeights):
    """Qwen2-VL's Parameters plus q/k norms and o bias; a bias the checkpoint lacks is zeros (adding 0 is exact)."""

    def __init__(self, load, cfg: TextConfig) -> None:
        self.embed = load("model.embed_tokens.weight")
        self.norm = load("model.norm.weight")
        self.head = self.embed if cfg.tie or not load.has("lm_head.weight") else load("lm_head.weight")
        self.layers = []
        from captioning_core.engine.checkpoint import parameter

        for i in range(cfg.layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            if cfg.attention_bias:
                bqkv = load.cat([a + f"{n}_proj.bias" for n in "qkv"], a + "qkv.bias")
                bo = load(a + "o_proj.bias")
            else:
                width = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim
                bqkv = parameter(np.zeros(width, np.float32), a + "qkv.bias", load.dtype)
                bo = parameter(np.zeros(cfg.hidden, np.float32), a + "o_proj.bias", load.dtype)
            self.layers.append({
                "ln1": load(p + "input_layernorm.weight"), "ln2": load(p + "post_attention_layernorm.weight"),
                "wqkv": load.cat([a + f"{n}_proj.weight" for n in "qkv"], a + "qkv.weight"), "bqkv": bqkv,
                "qn": load(a + "q_norm.weight"), "kn": load(a + "k_norm.weight"),
                "wo": load(a + "o_proj.weight"), "bo": bo,
                "wgu": load.cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], p + "mlp.gate_up.weight"),
                "wd": load(p + "mlp.down_proj.weight")})


class Layer(qwen2vl_text.Layer):
    def __init__(self, w: dict, cfg: TextConfig, slots: int, max_len: int, index: int, dtype) -> None:
        super().__init__(w, cfg, slots, max_len, index, dtype)
        self.qn, self.kn, self.bo = w["qn"], w["kn"], w["bo"]

    def _project(self, x):
        h, kv, hd = self.h, self.kv, self.hd
        lead = x.shape[:-1]
        qkv = layers.linear(layers.rms_norm(x, self.ln1, self.eps), self.wqkv, self.bqkv)
        q = layers.rms_norm(qkv[..., :h * hd].reshape(lead + (h, hd)), self.qn, self.eps)
        k = layers.rms_norm(qkv[..., h * hd:(h + kv) * hd].reshape(lead + (kv, hd)), self.kn, self.eps)
        v = qkv[..., (h + kv) * hd:].reshape(lead + (kv, hd))
        return q, k, v

    def _attn_out(self, a):
        return layers.linear(a, self.wo, self.bo)


class Prefill(qwen2vl_text.Prefill):
    """Qwen2-VL's prefill with one more input after ``vision``: ``deepstack`` [K, Nv, D], the tower's DeepStack
    features in the rows of ``vision`` (the first ``min(K, layers)`` are used)."""

    def __init__(self, w, cfg: TextConfig, layer_cells, slots: int, length: int, max_len: int, dtype,
                 all_logits: bool = False, deepstack: int = 0) -> None:
        super().__init__(w, cfg, layer_cells, slots, length, max_len, dtype, all_logits)
        self.depth, self.stack = cfg.layers, min(deepstack, cfg.layers)

    def construct(self, ids, vision, deepstack, vision_rows, is_video, angles, key_valid, eos_bias):
        x, sel = self._embed(ids, vision, vision_rows, is_video)
        cos, sin, madd = self._rope_mask(x, angles, key_valid)
        for i in range(self.depth):
            x = self.layers[i].prefill(x, cos, sin, madd, self.tail)
            if i < self.stack:
                add = ops.gather(deepstack[i].astype(x.dtype), vision_rows, 0)
                x = ops.select(sel, x + add, x)
        return self._finish(x, eos_bias)
