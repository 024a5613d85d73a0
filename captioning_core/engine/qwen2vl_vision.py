"""Qwen2-VL's vision tower as one compiled Cell over a padded patch count.

All videos of a batch go through in one call: their patches are concatenated and padded to a bucket, and one
block-diagonal additive mask (built in the graph from per-patch segment ids) keeps attention within each
temporal patch group, as transformers' ``cu_seqlens`` does, instead of a loop over videos. Padding patches form
their own segment and their merged tokens are never read.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from captioning_core.engine import layers
from captioning_core.engine.checkpoint import Checkpoint, parameter


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
    def __init__(self, ck: Checkpoint, prefix: str, cfg: VisionConfig, dtype: str) -> None:
        super().__init__()
        g = lambda n: parameter(ck.get(f"{prefix}{n}"), f"{prefix}{n}", dtype)  # noqa: E731
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
        n = x.shape[0]
        h = layers.layer_norm(x, self.n1w, self.n1b, 1e-6)
        qkv = layers.linear(h, self.wqkv, self.bqkv).reshape(n, 3, self.heads, self.head_dim)
        q = layers.rope(qkv[:, 0], cos, sin).transpose(1, 0, 2)  # [heads, n, hd]
        k = layers.rope(qkv[:, 1], cos, sin).transpose(1, 0, 2)
        v = qkv[:, 2].transpose(1, 0, 2)
        s = self.bmm_t(q, k) * self.scale + madd
        a = self.bmm(layers.softmax(s, x.dtype), v).transpose(1, 0, 2).reshape(n, self.heads * self.head_dim)
        x = x + layers.linear(a, self.wo, self.bo)
        h = layers.linear(layers.layer_norm(x, self.n2w, self.n2b, 1e-6), self.w1, self.b1)
        h = h * ops.sigmoid(1.702 * h)  # quick_gelu
        return x + layers.linear(h, self.w2, self.b2)


class VisionTower(nn.Cell):
    """(patches [N, C*tp*p*p], angles [N, head_dim], segment ids [N] int32) -> merged tokens [N/merge^2, D]."""

    def __init__(self, ck: Checkpoint, cfg: VisionConfig, dtype: str, prefix: str = "visual.") -> None:
        super().__init__()
        w = ck.get(f"{prefix}patch_embed.proj.weight")  # Conv3d with stride = kernel: a matmul per patch
        self.patch_w = parameter(w.reshape(w.shape[0], -1), f"{prefix}patch_embed.proj.weight", dtype)
        self.blocks = nn.CellList([VisionBlock(ck, f"{prefix}blocks.{i}.", cfg, dtype) for i in range(cfg.depth)])
        g = lambda n: parameter(ck.get(f"{prefix}merger.{n}"), f"{prefix}merger.{n}", dtype)  # noqa: E731
        self.lnw, self.lnb = g("ln_q.weight"), g("ln_q.bias")
        self.m0w, self.m0b, self.m2w, self.m2b = g("mlp.0.weight"), g("mlp.0.bias"), g("mlp.2.weight"), g("mlp.2.bias")
        self.group = cfg.merge * cfg.merge * cfg.embed_dim
        self.zero = Tensor(np.float32(0))
        self.neg = Tensor(np.float32(np.finfo(np.float32).min))

    def construct(self, pixels, angles, segments):
        x = layers.linear(pixels.astype(self.patch_w.dtype), self.patch_w)
        n = x.shape[0]
        cos = ops.cos(angles).reshape(n, 1, -1).astype(x.dtype)
        sin = ops.sin(angles).reshape(n, 1, -1).astype(x.dtype)
        same = segments.reshape(n, 1) == segments.reshape(1, n)
        madd = ops.select(same, self.zero.broadcast_to((n, n)), self.neg.broadcast_to((n, n))).astype(x.dtype)
        for blk in self.blocks:
            x = blk(x, cos, sin, madd)
        x = layers.layer_norm(x, self.lnw, self.lnb, 1e-6).reshape(-1, self.group)
        x = ops.gelu(layers.linear(x, self.m0w, self.m0b), approximate="none")
        return layers.linear(x, self.m2w, self.m2b)
