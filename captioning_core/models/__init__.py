"""Captioner registry. Adding a model means one module here and one line in CAPTIONERS."""

from __future__ import annotations

import importlib

CAPTIONERS = {
    "qwen2vl": "captioning_core.models.qwen2_vl:Qwen2VLCaptioner",
    "qwen2_5vl": "captioning_core.models.qwen2_5_vl:Qwen2_5VLCaptioner",
    "qwen3vl": "captioning_core.models.qwen3_vl:Qwen3VLCaptioner",
    "pllava": "captioning_core.models.pllava:PllavaCaptioner",
}


def captioner_class(name: str):
    try:
        target = CAPTIONERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(CAPTIONERS)}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
