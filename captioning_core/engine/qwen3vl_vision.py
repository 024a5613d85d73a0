"""Qwen3-VL's vision tower as one compiled Cell: Qwen2-VL's grid layout (``qwen2vl_vision.pack``: one row per
temporal patch group, so attention within a row is transformers' ``cu_seqlens`` block-diagonal attention) with
what Qwen3-VL changes.

- The patch embedding has a bias, and a learned position table (``pos_embed``, a square grid of
  ``num_position_embeddings``) is bilinearly interpolated to each video's patch grid and added to it. The
  interpolation's four corner indices and weights depend only on the grid, so the host computes them
  (``position_interpolation``, transformers' ``fast_pos_embed_interpolate``) and the graph gathers and sums.
- Blocks: LayerNorm, fused qkv with bias, 2-D rotary (Qwen2-VL's angles), a two-layer MLP (``linear_fc1/2``).
- DeepStack: after each block in ``deepstack_visual_indexes`` a merger with its LayerNorm after the 2x2 merge
  (``use_postshuffle_norm``) makes features the language model adds in its first layers; the final merger
  normalises before the merge. The tower returns (merged [G*S/4, D], DeepStack [K, G*S/4, D]).
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn, ops

from captioning_core.engine import layers

_ACTS = ("quick_gelu", "gelu_pytorch_tanh", "gelu")


class VisionConfig:
    def __init__(self, raw: dict) -> None:
        self.depth = int(raw["depth"])
        self.embed_dim = int(raw["hidden_size"])
        self.heads = int(raw["num_heads"])
        self.intermediate = int(raw["intermediate_size"])
        self.out_hidden = int(raw["out_hidden_size"])
        self.act = raw.get("hidden_act", "gelu_pytorch_tanh")
        self.merge = int(raw.get("spatial_merge_size", 2))
        self.patch = int(raw.get("patch_size", 16))
        self.temporal_patch = int(raw.get("temporal_patch_size", 2))
        self.positions = int(raw.get("num_position_embeddings", 2304))
        self.deepstack = tuple(int(i) for i in raw.get("deepstack_visual_indexes", ()))
        if self.act not in _ACTS:
            raise ValueError(f"vision act {self.act!r}: only {_ACTS} are implemented")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def side(self) -> int:
        """The position table's side (transformers' ``num_grid_per_side``)."""
        return int(self.positions ** 0.5)


def _act(x, name: str):
    if name == "quick_gelu":
        return x * ops.sigmoid(1.702 * x)
    return ops.gelu(x, approximate="tanh" if name == "gelu_pytorch_tanh" else "none")


class VisionBlock(nn.Cell):
    def __init__(self, prefix: str, cfg: VisionConfig, param) -> None:
        super().__init__()
        g = lambda n: param(f"{prefix}{n}")  # noqa: E731
        self.n1w, self.n1b = g("norm1.weight"), g("norm1.bias")
        self.n2w, self.n2b = g("norm2.weight"), g("norm2.bias")
        self.wqkv, self.bqkv = g("attn.qkv.weight"), g("attn.qkv.bias")
        self.wo, self.bo = g("attn.proj.weight"), g("attn.proj.bias")
        self.w1, self.b1 = g("mlp.linear_fc1.weight"), g("mlp.linear_fc1.bias")
        self.w2, self.b2 = g("mlp.linear_fc2.weight"), g("mlp.linear_fc2.bias")
        self.heads, self.head_dim, self.act = cfg.heads, cfg.head_dim, cfg.act
        self.scale = cfg.head_dim ** -0.5
        self.bmm_t, self.bmm = ops.BatchMatMul(transpose_b=True), ops.BatchMatMul()

    def construct(self, x, cos, sin, madd):
        groups, size = madd.shape[0], madd.shape[-1]
        h = layers.layer_norm(x, self.n1w, self.n1b, 1e-6)
        qkv = layers.linear(h, self.wqkv, self.bqkv).reshape(groups, size, 3, self.heads, self.head_dim)
        q = layers.rope(qkv[:, :, 0], cos, sin).transpose(0, 2, 1, 3)
        k = layers.rope(qkv[:, :, 1], cos, sin).transpose(0, 2, 1, 3)
        v = qkv[:, :, 2].transpose(0, 2, 1, 3)
        s = self.bmm_t(q, k) * self.scale + madd
        a = self.bmm(layers.softmax(s, x.dtype), v).transpose(0, 2, 1, 3)
        x = x + layers.linear(a.reshape(groups * size, self.heads * self.head_dim), self.wo, self.bo)
        h = _act(layers.linear(layers.layer_norm(x, self.n2w, self.n2b, 1e-6), self.w1, self.b1), self.act)
        return x + layers.linear(h, self.w2, self.b2)


class Merger(nn.Cell):
    """2x2 merge + MLP; ``postshuffle``: the LayerNorm over the merged 4*D vector (DeepStack's), else over D."""

    def __init__(self, prefix: str, cfg: VisionConfig, param, postshuffle: bool) -> None:
        super().__init__()
        g = lambda n: param(f"{prefix}{n}")  # noqa: E731
        self.nw, self.nb = g("norm.weight"), g("norm.bias")
        self.w1, self.b1 = g("linear_fc1.weight"), g("linear_fc1.bias")
        self.w2, self.b2 = g("linear_fc2.weight"), g("linear_fc2.bias")
        self.group = cfg.merge * cfg.merge * cfg.embed_dim
        self.postshuffle = postshuffle

    def construct(self, x):
        if self.postshuffle:
            x = layers.layer_norm(x.reshape(-1, self.group), self.nw, self.nb, 1e-6)
        else:
            x = layers.layer_norm(x, self.nw, self.nb, 1e-6).reshape(-1, self.group)
        x = ops.gelu(layers.linear(x, self.w1, self.b1), approximate="none")
        return layers.linear(x, self.w2, self.b2)


class VisionTower(nn.Cell):
    """(patches [G*S, F], angles [G*S, head_dim], key_valid [G, S] 0/1, pos_index [4, G*S] int32,
    pos_weight [4, G*S, 1] float32) -> (merged [G*S/4, D], DeepStack [K, G*S/4, D])."""

    def __init__(self, cfg: VisionConfig, param, prefix: str = "visual.") -> None:
        super().__init__()
        self.patch_w = param(f"{prefix}patch_embed.proj.weight", lambda w: w.reshape(w.shape[0], -1))
        self.patch_b = param(f"{prefix}patch_embed.proj.bias")
        self.pos = param(f"{prefix}pos_embed.weight")
        self.blocks = nn.CellList([VisionBlock(f"{prefix}blocks.{i}.", cfg, param) for i in range(cfg.depth)])
        self.merger = Merger(f"{prefix}merger.", cfg, param, False)
        self.stack = nn.CellList([Merger(f"{prefix}deepstack_merger_list.{j}.", cfg, param, True)
                                  for j in range(len(cfg.deepstack))])
        self.stack_at = tuple(cfg.deepstack.index(i) if i in cfg.deepstack else -1 for i in range(cfg.depth))
        self.depth, self.has_stack = cfg.depth, bool(cfg.deepstack)
        self.neg = Tensor(np.float32(np.finfo(np.float32).min))

    def construct(self, pixels, angles, key_valid, pos_index, pos_weight):
        x = layers.linear(pixels.astype(self.patch_w.dtype), self.patch_w, self.patch_b)
        p = ops.gather(self.pos, pos_index, 0) * pos_weight.astype(x.dtype)  # [4, G*S, D]
        x = x + (p[0] + p[1] + p[2] + p[3])
        groups, size = key_valid.shape
        cos = ops.cos(angles).reshape(groups, size, 1, -1).astype(x.dtype)
        sin = ops.sin(angles).reshape(groups, size, 1, -1).astype(x.dtype)
        madd = ((1 - key_valid) * self.neg).reshape(groups, 1, 1, size).astype(x.dtype)
        stacked = []
        for i in range(self.depth):
            x = self.blocks[i](x, cos, sin, madd)
            if self.stack_at[i] >= 0:
                stacked.append(self.stack[self.stack_at[i]](x))
        merged = self.merger(x)
        if not self.has_stack:
            return merged, ops.zeros((1,) + merged.shape, merged.dtype)
        return merged, ops.stack(stacked)


def position_interpolation(grid_thw: np.ndarray, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch, in the preprocessing's merge-grouped order: the four corner rows of the position table
    ([4, N] int32) and their bilinear weights ([4, N] float32), as transformers' ``fast_pos_embed_interpolate``
    (an h x w grid samples the side x side table at ``linspace(0, side - 1, h)`` x ``linspace(0, side - 1, w)``)."""
    idx_out, w_out = [], []
    for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist():
        hi = np.linspace(0, side - 1, h, dtype=np.float32)
        wi = np.linspace(0, side - 1, w, dtype=np.float32)
        hf, wf = hi.astype(np.int64), wi.astype(np.int64)
        hc, wc = np.minimum(hf + 1, side - 1), np.minimum(wf + 1, side - 1)
        dh, dw = (hi - hf).astype(np.float32), (wi - wf).astype(np.float32)
        one = np.float32(1)
        idx = [hf[:, None] * side + wf[None], hf[:, None] * side + wc[None],
               hc[:, None] * side + wf[None], hc[:, None] * side + wc[None]]
        wts = [(one - dh)[:, None] * (one - dw)[None], (one - dh)[:, None] * dw[None],
               dh[:, None] * (one - dw)[None], dh[:, None] * dw[None]]
        idx_out.append(np.stack([_merge_grouped(a, t, merge) for a in idx]))
        w_out.append(np.stack([_merge_grouped(a.astype(np.float32), t, merge) for a in wts]))
    return np.concatenate(idx_out, 1).astype(np.int32), np.concatenate(w_out, 1).astype(np.float32)


def _merge_grouped(a: np.ndarray, t: int, merge: int) -> np.ndarray:
    """A raster [h, w] per-patch array in the preprocessing's patch order (2x2 merge units), for t frames."""
    h, w = a.shape
    return np.tile(a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel(), t)


def pack(pixel_values: np.ndarray, grid_thw: np.ndarray, cfg: VisionConfig, groups: int, size: int):
    """``qwen2vl_vision.pack`` plus the position-table corners in the same layout: (pixels, angles, key_valid,
    pos_index [4, G*S], pos_weight [4, G*S, 1], rows)."""
    from captioning_core.engine import qwen2vl_vision

    pixels, angles, valid, rows = qwen2vl_vision.pack(pixel_values, grid_thw, cfg.head_dim, cfg.merge, groups,
                                                      size)
    idx, wts = position_interpolation(grid_thw, cfg.side, cfg.merge)
    pidx = np.zeros((4, groups * size), np.int32)
    pw = np.zeros((4, groups * size), np.float32)
    src, g = 0, 0
    for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist():
        n = h * w
        for _ in range(t):
            pidx[:, g * size:g * size + n] = idx[:, src:src + n]
            pw[:, g * size:g * size + n] = wts[:, src:src + n]
            src, g = src + n, g + 1
    return pixels, angles, valid, pidx, pw.reshape(4, -1, 1), rows
