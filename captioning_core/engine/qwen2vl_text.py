"""Qwen2-VL's language model (shared by Qwen2.5-VL) as two compiled Cells over one static KV cache.

A ``Session`` is one (batch slots, prompt bucket, cache length) shape: per layer a K and a V cache Parameter
``[slots, kv_heads, max_len, head_dim]``, a prefill Cell that runs the padded prompt and writes slots
``[0, prompt_len)`` with ``ops.assign``, and a decode Cell that writes slot ``t`` with
``ops.scatter_nd_update``. Both update the cache in place: a compiled graph holds its Parameters' buffers, and
replacing one (``Parameter.set_data``) detaches it (probe graph_decode: wrong tokens, then heap corruption).
Prompts are left-padded, so every row's next token goes into the same slot; a row's first real slot
(``start``) and its M-RoPE delta are per-row inputs. Weights are the shared Parameters of a ``Loader``.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from captioning_core.engine import layers


class TextConfig:
    def __init__(self, raw: dict, tie_word_embeddings: bool = False) -> None:
        self.hidden = int(raw["hidden_size"])
        self.heads = int(raw["num_attention_heads"])
        self._head_dim = int(raw.get("head_dim") or self.hidden // self.heads)
        self.kv_heads = int(raw.get("num_key_value_heads") or self.heads)
        self.intermediate = int(raw["intermediate_size"])
        self.vocab = int(raw["vocab_size"])
        self.layers = int(raw["num_hidden_layers"])
        self.eps = float(raw["rms_norm_eps"])
        self.theta = float(raw.get("rope_theta", 1000000.0))
        self.mrope_section = list((raw.get("rope_scaling") or {})["mrope_section"])
        self.tie = bool(raw.get("tie_word_embeddings", tie_word_embeddings))
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text act {raw.get('hidden_act')!r}: only silu is implemented")
        if raw.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not implemented")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} does not cover head_dim/2 = {self.head_dim // 2}")

    @property
    def head_dim(self) -> int:
        return self._head_dim

    def inv_freq(self) -> np.ndarray:
        hd = self.head_dim
        return (1.0 / (self.theta ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd))).astype(np.float32)


class TextWeights:
    """The language model's Parameters, fused where that saves matmuls (q|k|v, gate|up)."""

    def __init__(self, load, cfg: TextConfig) -> None:
        self.embed = load("model.embed_tokens.weight")
        self.norm = load("model.norm.weight")
        self.head = self.embed if cfg.tie or not load.has("lm_head.weight") else load("lm_head.weight")
        self.layers = []
        for i in range(cfg.layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "ln1": load(p + "input_layernorm.weight"), "ln2": load(p + "post_attention_layernorm.weight"),
                "wqkv": load.cat([p + f"self_attn.{n}_proj.weight" for n in "qkv"], p + "self_attn.qkv.weight"),
                "bqkv": load.cat([p + f"self_attn.{n}_proj.bias" for n in "qkv"], p + "self_attn.qkv.bias"),
                "wo": load(p + "self_attn.o_proj.weight"),
                "wgu": load.cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], p + "mlp.gate_up.weight"),
                "wd": load(p + "mlp.down_proj.weight")})


class Layer(nn.Cell):
    """One decoder layer with its own K/V cache and the shared weights."""

    def __init__(self, w: dict, cfg: TextConfig, slots: int, max_len: int, index: int, dtype) -> None:
        super().__init__()
        self.ln1, self.ln2, self.wqkv, self.bqkv = w["ln1"], w["ln2"], w["wqkv"], w["bqkv"]
        self.wo, self.wgu, self.wd = w["wo"], w["wgu"], w["wd"]
        hd, kv = cfg.head_dim, cfg.kv_heads
        self.kc = Parameter(Tensor(np.zeros((slots, kv, max_len, hd), np.float32), dtype=dtype),
                            name=f"cache.{index}.k", requires_grad=False)
        self.vc = Parameter(Tensor(np.zeros((slots, kv, max_len, hd), np.float32), dtype=dtype),
                            name=f"cache.{index}.v", requires_grad=False)
        self.h, self.kv, self.hd, self.g = cfg.heads, kv, hd, cfg.heads // kv
        self.inter, self.eps, self.scale = cfg.intermediate, cfg.eps, hd ** -0.5
        self.max_len = max_len
        self.bmm_t, self.bmm = ops.BatchMatMul(transpose_b=True), ops.BatchMatMul()

    def _mlp(self, x):
        gu = layers.linear(layers.rms_norm(x, self.ln2, self.eps), self.wgu)
        return x + layers.linear(ops.silu(gu[..., :self.inter]) * gu[..., self.inter:], self.wd)

    def _project(self, x):
        """q [..., h, hd], k and v [..., kv, hd] of x [..., D] (``...``: [B, L] in prefill, [B] in decode)."""
        h, kv, hd = self.h, self.kv, self.hd
        lead = x.shape[:-1]
        qkv = layers.linear(layers.rms_norm(x, self.ln1, self.eps), self.wqkv, self.bqkv)
        q = qkv[..., :h * hd].reshape(lead + (h, hd))
        k = qkv[..., h * hd:(h + kv) * hd].reshape(lead + (kv, hd))
        v = qkv[..., (h + kv) * hd:].reshape(lead + (kv, hd))
        return q, k, v

    def _attn_out(self, a):
        return layers.linear(a, self.wo)

    def prefill(self, x, cos, sin, madd, tail):
        """x [B, L, D]; cos/sin [B, 1, L, hd]; madd [B, 1, 1, L, L]; tail: zeros [B, kv, max_len - L, hd]."""
        b, n = x.shape[0], x.shape[1]
        h, kv, hd = self.h, self.kv, self.hd
        q, k, v = self._project(x)
        q = layers.rope(q.transpose(0, 2, 1, 3), cos, sin)
        k = layers.rope(k.transpose(0, 2, 1, 3), cos, sin)
        v = v.transpose(0, 2, 1, 3)
        ops.assign(self.kc, ops.cat((k, tail), 2))
        ops.assign(self.vc, ops.cat((v, tail), 2))
        qg = q.reshape(b, kv, self.g * n, hd)  # query heads h = kv_head * g + j, as transformers' repeat_kv
        s = (self.bmm_t(qg, k) * self.scale).reshape(b, kv, self.g, n, n) + madd
        a = self.bmm(layers.softmax(s, x.dtype).reshape(b, kv, self.g * n, n), v)
        a = a.reshape(b, h, n, hd).transpose(0, 2, 1, 3).reshape(b, n, h * hd)
        return self._mlp(x + self._attn_out(a))

    def step(self, x, cos, sin, madd, idx):
        """x [B, D]; cos/sin [B, 1, hd]; madd [B, 1, 1, max_len]; idx [B, kv, 3] (row, kv head, slot t)."""
        b = x.shape[0]
        h, kv, hd = self.h, self.kv, self.hd
        q, k, v = self._project(x)
        q = layers.rope(q, cos, sin)
        k = layers.rope(k, cos, sin)
        kc = ops.scatter_nd_update(self.kc, idx, k)
        vc = ops.scatter_nd_update(self.vc, idx, v)
        s = self.bmm_t(q.reshape(b, kv, self.g, hd), kc) * self.scale + madd  # [B, kv, g, max_len]
        a = self.bmm(layers.softmax(s, x.dtype), vc).reshape(b, h * hd)
        return self._mlp(x + self._attn_out(a))


def _head(cell, x):
    return layers.linear(layers.rms_norm(x, cell.norm, cell.eps), cell.head)


class Prefill(nn.Cell):
    """(ids [B, L] int32, vision [Nv, D], vision_rows [B, L] int32, is_video [B, L] bool,
    angles [B, L, hd/2] float32, key_valid [B, L] float 0/1, eos_bias [V]) -> (next token [B] int32, logits).

    Logits are the last position's [B, V], or every position's [B, L, V] with ``all_logits``."""

    def __init__(self, w: TextWeights, cfg: TextConfig, layer_cells: nn.CellList, slots: int, length: int,
                 max_len: int, dtype, all_logits: bool = False) -> None:
        super().__init__()
        self.embed, self.norm, self.head, self.layers = w.embed, w.norm, w.head, layer_cells
        self.eps, self.all_logits = cfg.eps, all_logits
        self.tail = Tensor(np.zeros((slots, cfg.kv_heads, max_len - length, cfg.head_dim), np.float32), dtype=dtype)
        self.causal = Tensor(np.tril(np.ones((length, length), np.float32)).reshape(1, 1, 1, length, length))
        self.neg = Tensor(np.float32(np.finfo(np.float32).min))

    def construct(self, ids, vision, vision_rows, is_video, angles, key_valid, eos_bias):
        x, _ = self._embed(ids, vision, vision_rows, is_video)
        cos, sin, madd = self._rope_mask(x, angles, key_valid)
        for layer in self.layers:
            x = layer.prefill(x, cos, sin, madd, self.tail)
        return self._finish(x, eos_bias)

    def _embed(self, ids, vision, vision_rows, is_video):
        """Token embeddings with each video token's row of ``vision`` in place, and the [B, L, D] video mask."""
        b, n = ids.shape
        x = ops.gather(self.embed, ids, 0)
        sel = is_video.reshape(b, n, 1).broadcast_to(x.shape)
        return ops.select(sel, ops.gather(vision.astype(x.dtype), vision_rows, 0), x), sel

    def _rope_mask(self, x, angles, key_valid):
        b, n = x.shape[0], x.shape[1]
        emb = ops.cat((angles, angles), -1).reshape(b, 1, n, -1)
        cos, sin = ops.cos(emb).astype(x.dtype), ops.sin(emb).astype(x.dtype)
        allowed = self.causal * key_valid.reshape(b, 1, 1, 1, n)
        return cos, sin, ((1 - allowed) * self.neg).astype(x.dtype)

    def _finish(self, x, eos_bias):
        if self.all_logits:
            logits = _head(self, x)
            last = logits[:, -1]
        else:
            logits = _head(self, x[:, -1])
            last = logits
        return ops.argmax(last.astype(ms.float32) + eos_bias, -1).astype(ms.int32), logits


class Step(nn.Cell):
    """(tok [B] int32, t [] int32 cache slot, delta [B] int32 rope delta, start [B] int32 first real slot,
    eos_bias [V] float32) -> (next greedy token [B] int32, logits [B, V]).

    M-RoPE in decode has the same id on all three axes: ``t + delta``."""

    def __init__(self, w: TextWeights, cfg: TextConfig, layer_cells: nn.CellList, slots: int, max_len: int) -> None:
        super().__init__()
        self.embed, self.norm, self.head, self.layers = w.embed, w.norm, w.head, layer_cells
        self.eps, self.slots, self.kv = cfg.eps, slots, cfg.kv_heads
        self.inv_freq = Tensor(cfg.inv_freq().reshape(1, -1))
        self.slot_ids = Tensor(np.arange(max_len, dtype=np.int32).reshape(1, -1))
        bk = np.stack(np.meshgrid(np.arange(slots), np.arange(cfg.kv_heads), indexing="ij"), -1)
        self.base_idx = Tensor(bk.astype(np.int32))  # [B, kv, 2]
        self.neg = Tensor(np.float32(np.finfo(np.float32).min))

    def construct(self, tok, t, delta, start, eos_bias):
        b = self.slots
        x = ops.gather(self.embed, tok, 0)
        fr = (t + delta).astype(ms.float32).reshape(b, 1) * self.inv_freq
        emb = ops.cat((fr, fr), -1).reshape(b, 1, -1)
        cos, sin = ops.cos(emb).astype(x.dtype), ops.sin(emb).astype(x.dtype)
        valid = ops.logical_and(self.slot_ids >= start.reshape(b, 1), self.slot_ids <= t).astype(ms.float32)
        madd = ((1 - valid) * self.neg).reshape(b, 1, 1, -1).astype(x.dtype)
        idx = ops.cat((self.base_idx, ops.broadcast_to(t.reshape(1, 1, 1), (b, self.kv, 1))), -1)
        for layer in self.layers:
            x = layer.step(x, cos, sin, madd, idx)
        logits = _head(self, x)
        return ops.argmax(logits.astype(ms.float32) + eos_bias, -1).astype(ms.int32), logits
