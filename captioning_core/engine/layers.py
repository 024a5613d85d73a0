"""Small graph-side functions shared by the cells (parsed by MindSpore's AST capture when a cell calls them)."""

from __future__ import annotations

import mindspore as ms
from mindspore import ops

_MM_T = ops.MatMul(transpose_b=True)


def linear(x, weight, bias=None):
    """``x @ weight.T (+ bias)`` over the last axis, with the checkpoint's [out, in] layout kept as stored."""
    shape = x.shape
    y = _MM_T(x.reshape(-1, shape[-1]), weight)
    if bias is not None:
        y = y + bias
    return y.reshape(shape[:-1] + (weight.shape[0],))


def rms_norm(x, weight, eps: float):
    h = x.astype(ms.float32)
    h = h * ops.rsqrt(ops.mean(h * h, -1, keep_dims=True) + eps)
    return weight * h.astype(x.dtype)


def layer_norm(x, weight, bias, eps: float):
    h = x.astype(ms.float32)
    mean = ops.mean(h, -1, keep_dims=True)
    c = h - mean
    var = ops.mean(c * c, -1, keep_dims=True)
    return (c * ops.rsqrt(var + eps)).astype(x.dtype) * weight + bias


def rotate_half(x):
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def softmax(scores, dtype):
    return ops.softmax(scores.astype(ms.float32), -1).astype(dtype)
