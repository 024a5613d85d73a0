"""Rotary position ids on the host, in numpy: Qwen2-VL's M-RoPE for the language model and the 2-D rotary of
its vision tower. They depend only on token ids and grids, so computing them outside the graphs keeps the graphs
free of data-dependent shapes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VisionTokens:
    """The special token ids that place media in a prompt."""
    vision_start: int
    image: int
    video: int
    merge_size: int


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, tokens: VisionTokens,
                    video_grid_thw: np.ndarray | None = None,
                    image_grid_thw: np.ndarray | None = None,
                    video_time_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL's (temporal, height, width) position ids ``[3, B, L]`` and the per-row rope delta ``[B]``.

    As transformers' ``get_rope_index``: over each row's unmasked tokens, text advances all three ids by one;
    a medium's tokens take (t, h, w) grid coordinates offset by the position after the text before it; the text
    after it restarts at the largest id so far plus one. Masked (padding) positions get 1. The delta is
    ``max id + 1 - L``: a decode step at cache slot ``s`` has position ``s + delta`` on all three axes.
    ``video_time_scale`` (Qwen2.5-VL) multiplies each video's temporal ids (``int(second_per_grid_t) *
    tokens_per_second``, truncated to integers as transformers 4.57.1 does); Qwen2-VL's is 1.
    """
    bsz, length = input_ids.shape
    positions = np.ones((3, bsz, length), np.int64)
    deltas = np.zeros(bsz, np.int64)
    grids = {"video": iter([] if video_grid_thw is None else np.asarray(video_grid_thw).tolist()),
             "image": iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist())}
    m = tokens.merge_size
    scales = iter([] if video_time_scale is None else np.asarray(video_time_scale).tolist())
    for row in range(bsz):
        keep = attention_mask[row] == 1
        ids = input_ids[row][keep]
        if not len(ids):  # a spare (all-padding) row of a padded batch
            continue
        pieces, st, nxt = [], 0, 0
        for start in np.flatnonzero(ids[:-1] == tokens.vision_start):
            kind = {tokens.video: "video", tokens.image: "image"}.get(int(ids[start + 1]))
            if kind is None:
                continue
            t, h, w = next(grids[kind])
            scale = next(scales, 1) if kind == "video" else 1
            gh, gw = h // m, w // m
            ed = start + 1
            text = ed - st
            pieces.append(np.broadcast_to(np.arange(text) + nxt, (3, text)))
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            if scale != 1:
                tt = (tt * scale).astype(np.int64)
            pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + text + nxt)
            nxt = int(pieces[-1].max()) + 1
            st = ed + t * gh * gw
        if st < len(ids):
            pieces.append(np.broadcast_to(np.arange(len(ids) - st) + nxt, (3, len(ids) - st)))
        pos = np.concatenate(pieces, axis=1)
        positions[:, row, keep] = pos
        deltas[row] = int(pos.max()) + 1 - length
    return positions, deltas


def section_positions(positions: np.ndarray, mrope_section: list[int]) -> np.ndarray:
    """``[3, B, L]`` ids -> ``[B, L, head_dim/2]`` float32: for each rotary frequency, the id of the axis
    (temporal, height, width) whose section it falls in. Multiplying by the inverse frequencies then gives the
    M-RoPE angles directly, the same products transformers takes from its three full rotary tables."""
    axis = np.concatenate([np.full(n, i, np.int64) for i, n in enumerate(mrope_section)])
    return axis_positions(positions, axis)


def interleaved_axes(mrope_section: list[int], frequencies: int) -> np.ndarray:
    """Qwen3-VL's interleaved M-RoPE: per rotary frequency, its axis (0 T, 1 H, 2 W). As transformers'
    ``apply_interleaved_mrope``: frequency ``j`` is H if ``j % 3 == 1`` and ``j < 3 * section[1]``, W if
    ``j % 3 == 2`` and ``j < 3 * section[2]``, else T (a stop past the last frequency is clamped)."""
    axis = np.zeros(frequencies, np.int64)
    for dim, offset in ((1, 1), (2, 2)):
        axis[offset:min(3 * mrope_section[dim], frequencies):3] = dim
    return axis


def axis_positions(positions: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """``[3, B, L]`` ids -> ``[B, L, len(axis)]`` float32: for frequency ``j`` the ids of axis ``axis[j]``."""
    return np.ascontiguousarray(positions[axis].transpose(1, 2, 0)).astype(np.float32)


def split_video_grids(video_grid_thw: np.ndarray | None) -> np.ndarray | None:
    """Qwen3-VL writes each temporal group of a video as its own timestamped ``<|vision_start|>`` run, so its
    ``get_rope_index`` takes every (t, h, w) as t grids (1, h, w), in order."""
    if video_grid_thw is None:
        return None
    grid = np.asarray(video_grid_thw).reshape(-1, 3)
    out = np.repeat(grid, grid[:, 0], axis=0)
    out[:, 0] = 1
    return out


def vision_positions(grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """``[N, 2]`` (row, column) of every patch, in the merge-grouped patch order the preprocessing emits."""
    out = []
    for t, h, w in np.asarray(grid_thw).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = [a.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(0, 2, 1, 3).ravel()
                  for a in (hh, ww)]
        out.append(np.tile(np.stack(blocks, -1), (t, 1)))
    return np.concatenate(out)


def vision_angles(grid_thw: np.ndarray, merge_size: int, head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """``[N, head_dim]`` float32 rotary angles of the vision tower (row angles, column angles, repeated)."""
    dim = head_dim // 2
    inv = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    pos = vision_positions(grid_thw, merge_size).astype(np.float32)
    half = (pos[:, :, None] * inv[None, None, :]).reshape(len(pos), -1)
    return np.concatenate([half, half], axis=-1).astype(np.float32)


def frame_segments(grid_thw: np.ndarray) -> np.ndarray:
    """``[N]`` int32: one id per temporal patch group across all videos; attention stays within a group."""
    sizes = [h * w for t, h, w in np.asarray(grid_thw).tolist() for _ in range(t)]
    return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
