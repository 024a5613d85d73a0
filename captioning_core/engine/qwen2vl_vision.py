"""Qwen2-VL's vision tower as one compiled Cell over every video of a batch.

transformers runs the tower over the concatenated patches of all videos and keeps attention within each
temporal patch group (``cu_seqlens``): a block-diagonal mask. Here that block-diagonal structure is laid out
densely: each temporal group's patches sit in their own row of a ``[groups, patches]`` grid (both padded to a
bucket), and attention is one batched matmul per row with a key-padding mask. That is the same arithmetic as the
block-diagonal mask without its quadratic cost in the batch's total patch count. Padding patches are never
read back: the merged tokens the language model takes are gathered by index on the host's instructions.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from captioning_core.engine import layers
from captioning_core.engine.checkpoint import Checkpoint


class VisionConfig:
    def __init__(self, raw: dict) -> None:
        self.depth = int(raw["depth"])
        self.embed_dim = int(raw["embed_dim"])
        self.heads = int(raw["num_heads"])
        self.hidden_size = int(raw["hidden_size"])  # the language model's width (the merger's output)
        self.mlp_dim = int(self.embed_dim * raw["mlp_ratio"])
        self.act = raw.get("hidden_act", "quick_gelu")
        self.merge = int(raw.get("spatial_merge_size", 2))
        self.patch = int(raw.get("patch_size", 14))
        self.temporal_patch = int(raw.get("temporal_patch_size", 2))
        self.channels = int(raw.get("in_channels", 3))
        if self.act != "quick_gelu":
            raise ValueError(f"vision act {self.act!r}: only Qwen2-VL's quick_gelu is implemented")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads


class VisionBlock(nn.Cell):
    def __init__(self, ck: Checkpoint, prefix: str, cfg: VisionConfig, param) -> None:
        super().__init__()
        g = lambda n: param(f"{prefix}{n}")  # noqa: E731
        self.n1w, self.n1b = g("norm1.weight"), g("norm1.bias")
        self.n2w, self.n2b = g("norm2.weight"), g("norm2.bias")
        self.wqkv, self.bqkv = g("attn.qkv.weight"), g("attn.qkv.bias")
        self.wo, self.bo = g("attn.proj.weight"), g("attn.proj.bias")
        self.w1, self.b1 = g("mlp.fc1.weight"), g("mlp.fc1.bias")
        self.w2, self.b2 = g("mlp.fc2.weight"), g("mlp.fc2.bias")
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.bmm_t, self.bmm = ops.BatchMatMul(transpose_b=True), ops.BatchMatMul()

    def construct(self, x, cos, sin, madd):
        groups, size = madd.shape[0], madd.shape[-1]
        h = layers.layer_norm(x, self.n1w, self.n1b, 1e-6)
        qkv = layers.linear(h, self.wqkv, self.bqkv).reshape(groups, size, 3, self.heads, self.head_dim)
        q = layers.rope(qkv[:, :, 0], cos, sin).transpose(0, 2, 1, 3)  # [groups, heads, size, hd]
        k = layers.rope(qkv[:, :, 1], cos, sin).transpose(0, 2, 1, 3)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)
        s = self.bmm_t(q, k) * self.scale + madd
        a = self.bmm(layers.softmax(s, x.dtype), v).transpose(0, 2, 1, 3)
        x = x + layers.linear(a.reshape(groups * size, self.heads * self.head_dim), self.wo, self.bo)
        h = layers.linear(layers.layer_norm(x, self.n2w, self.n2b, 1e-6), self.w1, self.b1)
        h = h * ops.sigmoid(1.702 * h)  # quick_gelu
        return x + layers.linear(h, self.w2, self.b2)


class VisionTower(nn.Cell):
    """(patches [G*S, C*tp*p*p], angles [G*S, head_dim], key_valid [G, S] float 0/1) -> merged [G*S/4, D].

    Row ``g*S + i`` holds patch ``i`` of temporal group ``g``; S is a multiple of merge^2, so the 2x2 merge
    groups never straddle two temporal groups."""

    def __init__(self, ck: Checkpoint, cfg: VisionConfig, param, prefix: str = "visual.") -> None:
        super().__init__()
        self.patch_w = param(f"{prefix}patch_embed.proj.weight", lambda w: w.reshape(w.shape[0], -1))
        self.blocks = nn.CellList([VisionBlock(ck, f"{prefix}blocks.{i}.", cfg, param) for i in range(cfg.depth)])
        g = lambda n: param(f"{prefix}merger.{n}")  # noqa: E731
        self.lnw, self.lnb = g("ln_q.weight"), g("ln_q.bias")
        self.m0w, self.m0b, self.m2w, self.m2b = g("mlp.0.weight"), g("mlp.0.bias"), g("mlp.2.weight"), g("mlp.2.bias")
        self.group = cfg.merge * cfg.merge * cfg.embed_dim
        self.neg = Tensor(np.float32(np.finfo(np.float32).min))

    def construct(self, pixels, angles, key_valid):
        x = layers.linear(pixels.astype(self.patch_w.dtype), self.patch_w)
        groups, size = key_valid.shape
        cos = ops.cos(angles).reshape(groups, size, 1, -1).astype(x.dtype)
        sin = ops.sin(angles).reshape(groups, size, 1, -1).astype(x.dtype)
        madd = ((1 - key_valid) * self.neg).reshape(groups, 1, 1, size).astype(x.dtype)
        for blk in self.blocks:
            x = blk(x, cos, sin, madd)
        x = layers.layer_norm(x, self.lnw, self.lnb, 1e-6).reshape(-1, self.group)
        x = ops.gelu(layers.linear(x, self.m0w, self.m0b), approximate="none")
        return layers.linear(x, self.m2w, self.m2b)


def pack(pixel_values: np.ndarray, grid_thw: np.ndarray, head_dim: int, merge: int, groups: int,
         size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lay a batch's patches out as the tower's ``[groups, size]`` grid.

    Returns (pixels [groups*size, F], angles [groups*size, head_dim], key_valid [groups, size] float32,
    rows [n_merged]: for each merged token of the batch, in transformers' order, its row in the tower's output).
    """
    from captioning_core.engine.rope import vision_angles

    feat = pixel_values.shape[1]
    pixels = np.zeros((groups * size, feat), np.float32)
    angles = np.zeros((groups * size, head_dim), np.float32)
    valid = np.zeros((groups, size), np.float32)
    rows, src, g = [], 0, 0
    all_angles = vision_angles(grid_thw, merge, head_dim)
    for t, h, w in np.asarray(grid_thw).tolist():
        n = h * w
        for _ in range(t):
            pixels[g * size:g * size + n] = pixel_values[src:src + n]
            angles[g * size:g * size + n] = all_angles[src:src + n]
            valid[g, :n] = 1
            rows.append(np.arange(n // (merge * merge)) + g * size // (merge * merge))
            src, g = src + n, g + 1
    return pixels, angles, valid, np.concatenate(rows).astype(np.int32)
