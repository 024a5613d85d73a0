"""Qwen2.5-VL's vision tower (RMSNorm, gated MLP, windowed attention) as one compiled Cell.

The grid layout is Qwen2-VL's (``qwen2vl_vision``): one row per temporal patch group. transformers reorders each
frame's 2x2 merge units window by window (``get_window_index``) and runs most blocks with attention inside a
window, the ``fullatt_block_indexes`` ones across the whole frame. Here the host applies the same reordering
when it packs a row, and the windowed blocks take a mask that keeps a query within its own window (same window
id); full blocks keep the key-padding mask only. The merger's output is read back in transformers' original
order through the gather rows the host returns (its ``reverse_indices``).
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from captioning_core.engine import layers

_ACTS = ("silu", "quick_gelu")


class VisionConfig:
    def __init__(self, raw: dict) -> None:
        self.depth = int(raw["depth"])
        self.embed_dim = int(raw["hidden_size"])
        self.heads = int(raw["num_heads"])
        self.out_hidden = int(raw["out_hidden_size"])
        self.intermediate = int(raw["intermediate_size"])
        self.act = raw.get("hidden_act", "silu")
        self.merge = int(raw.get("spatial_merge_size", 2))
        self.patch = int(raw.get("patch_size", 14))
        self.window = int(raw.get("window_size", 112))
        self.full_blocks = tuple(int(i) for i in raw.get("fullatt_block_indexes", ()))
        self.tokens_per_second = raw.get("tokens_per_second", 2)
        if self.act not in _ACTS:
            raise ValueError(f"vision act {self.act!r}: only {_ACTS} are implemented")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def window_units(self) -> int:
        """A window's side in 2x2 merge units (transformers' ``vit_merger_window_size``)."""
        return self.window // self.merge // self.patch


class VisionBlock(nn.Cell):
    def __init__(self, prefix: str, cfg: VisionConfig, param) -> None:
        super().__init__()
        g = lambda n: param(f"{prefix}{n}")  # noqa: E731
        self.n1w, self.n2w = g("norm1.weight"), g("norm2.weight")
        self.wqkv, self.bqkv = g("attn.qkv.weight"), g("attn.qkv.bias")
        self.wo, self.bo = g("attn.proj.weight"), g("attn.proj.bias")
        self.wg, self.bg = g("mlp.gate_proj.weight"), g("mlp.gate_proj.bias")
        self.wu, self.bu = g("mlp.up_proj.weight"), g("mlp.up_proj.bias")
        self.wd, self.bd = g("mlp.down_proj.weight"), g("mlp.down_proj.bias")
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.silu = cfg.act == "silu"
        self.bmm_t, self.bmm = ops.BatchMatMul(transpose_b=True), ops.BatchMatMul()

    def construct(self, x, cos, sin, madd):
        groups, size = madd.shape[0], madd.shape[-1]
        h = layers.rms_norm(x, self.n1w, 1e-6)
        qkv = layers.linear(h, self.wqkv, self.bqkv).reshape(groups, size, 3, self.heads, self.head_dim)
        q = layers.rope(qkv[:, :, 0], cos, sin).transpose(0, 2, 1, 3)
        k = layers.rope(qkv[:, :, 1], cos, sin).transpose(0, 2, 1, 3)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)
        s = self.bmm_t(q, k) * self.scale + madd
        a = self.bmm(layers.softmax(s, x.dtype), v).transpose(0, 2, 1, 3)
        x = x + layers.linear(a.reshape(groups * size, self.heads * self.head_dim), self.wo, self.bo)
        h = layers.rms_norm(x, self.n2w, 1e-6)
        gate = layers.linear(h, self.wg, self.bg)
        gate = ops.silu(gate) if self.silu else gate * ops.sigmoid(1.702 * gate)
        return x + layers.linear(gate * layers.linear(h, self.wu, self.bu), self.wd, self.bd)


class VisionTower(nn.Cell):
    """(patches [G*S, F], angles [G*S, head_dim], key_valid [G, S] 0/1, window [G, S] float window ids)
    -> merged [G*S/4, D], rows in each frame's window order."""

    def __init__(self, cfg: VisionConfig, param, prefix: str = "visual.") -> None:
        super().__init__()
        self.patch_w = param(f"{prefix}patch_embed.proj.weight", lambda w: w.reshape(w.shape[0], -1))
        self.blocks = nn.CellList([VisionBlock(f"{prefix}blocks.{i}.", cfg, param) for i in range(cfg.depth)])
        self.full = tuple(i in cfg.full_blocks for i in range(cfg.depth))
        self.depth = cfg.depth
        g = lambda n: param(f"{prefix}merger.{n}")  # noqa: E731
        self.lnw = g("ln_q.weight")
        self.m0w, self.m0b, self.m2w, self.m2b = g("mlp.0.weight"), g("mlp.0.bias"), g("mlp.2.weight"), g("mlp.2.bias")
        self.group = cfg.merge * cfg.merge * cfg.embed_dim
        self.neg = Tensor(np.float32(np.finfo(np.float32).min))

    def construct(self, pixels, angles, key_valid, window):
        x = layers.linear(pixels.astype(self.patch_w.dtype), self.patch_w)
        groups, size = key_valid.shape
        cos = ops.cos(angles).reshape(groups, size, 1, -1).astype(x.dtype)
        sin = ops.sin(angles).reshape(groups, size, 1, -1).astype(x.dtype)
        full = ((1 - key_valid) * self.neg).reshape(groups, 1, 1, size).astype(x.dtype)
        same = (window.reshape(groups, size, 1) == window.reshape(groups, 1, size)).astype(key_valid.dtype)
        allowed = same * key_valid.reshape(groups, 1, size)
        win = ((1 - allowed) * self.neg).reshape(groups, 1, size, size).astype(x.dtype)
        for i in range(self.depth):
            x = self.blocks[i](x, cos, sin, full if self.full[i] else win)
        x = layers.rms_norm(x, self.lnw, 1e-6).reshape(-1, self.group)
        x = ops.gelu(layers.linear(x, self.m0w, self.m0b), approximate="none")
        return layers.linear(x, self.m2w, self.m2b)


def window_order(h_units: int, w_units: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame's merge units (raster order ``r * w_units + c``) in transformers' window order, and each one's
    window id (in that order)."""
    r, c = np.meshgrid(np.arange(h_units), np.arange(w_units), indexing="ij")
    nwc = -(-w_units // side)
    wid = (r // side) * nwc + (c // side)
    key = np.stack([wid.ravel(), (r % side).ravel(), (c % side).ravel()])
    order = np.lexsort(key[::-1])
    return order, wid.ravel()[order]


def pack(pixel_values: np.ndarray, grid_thw: np.ndarray, cfg: VisionConfig, groups: int,
         size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """As ``qwen2vl_vision.pack``, with each row's merge units in window order, plus the window ids [G, S]."""
    from captioning_core.engine.rope import vision_angles

    unit = cfg.merge * cfg.merge
    pixels = np.zeros((groups * size, pixel_values.shape[1]), np.float32)
    angles = np.zeros((groups * size, cfg.head_dim), np.float32)
    valid = np.zeros((groups, size), np.float32)
    window = np.full((groups, size), -1, np.float32)
    all_angles = vision_angles(grid_thw, cfg.merge, cfg.head_dim)
    rows, src, g = [], 0, 0
    for t, h, w in np.asarray(grid_thw).tolist():
        n = h * w
        order, wid = window_order(h // cfg.merge, w // cfg.merge, cfg.window_units)
        patch_order = (order[:, None] * unit + np.arange(unit)).ravel()
        inverse = np.argsort(order)
        for _ in range(t):
            base = g * size
            pixels[base:base + n] = pixel_values[src:src + n][patch_order]
            angles[base:base + n] = all_angles[src:src + n][patch_order]
            valid[g, :n] = 1
            window[g, :n] = np.repeat(wid, unit)
            rows.append(inverse + base // unit)
            src, g = src + n, g + 1
    return pixels, angles, valid, window, np.concatenate(rows).astype(np.int32)
