"""MindSpore/mindnlp process setup for one rank: device, import order, dtypes and the AllGather collective.

A rank's signal handling (graceful stop, dying with msrun) is in ``captioning_core.signals``.
"""

from __future__ import annotations

import sys
import types

_device: dict[str, object] = {"target": None, "ready": False}


def configure(device_target: str) -> None:
    """Remember the device; MindSpore is imported only when a model or a collective needs it, so a rank
    with nothing left to caption finishes without paying for the import."""
    _device["target"] = device_target


def setup_device(device_target: str | None = None) -> None:
    """Select the MindSpore device (once) before anything imports mindnlp or torch."""
    target = device_target or _device["target"]
    if _device["ready"] or target is None:
        return
    import mindspore

    mindspore.set_device(target)
    if target == "Ascend":
        mindspore.set_context(mode=mindspore.PYNATIVE_MODE)
    _device["ready"] = True


class _NotLoaded(types.ModuleType):
    """Stands in for a module the stage never uses; any use names it instead of failing obscurely."""

    def __getattr__(self, attr: str):
        raise AttributeError(f"{self.__name__} is not loaded by the captioning stage (runtime.import_mindnlp "
                             f"skips it); no captioner uses {attr!r}")


#: mindnlp's ``__init__`` imports its diffusers port, which imports the whole ``diffusers`` package: 1.5 s of
#: a rank's 5.3 s ``import mindnlp`` on these machines with a warm file cache (benchmark 12), more when cold.
#: No captioner uses it.
SKIPPED_MODULES = ("mindnlp.diffusers",)


def import_mindnlp() -> None:
    """mindnlp must be imported before anything imports torch: it redirects ``torch`` to mindtorch.
    Its diffusers port (``SKIPPED_MODULES``) is left out."""
    setup_device()
    if "torch" in sys.modules and "mindnlp" not in sys.modules:
        raise RuntimeError("torch was imported before mindnlp; the model would run on real PyTorch")
    if "mindnlp" not in sys.modules:
        for name in SKIPPED_MODULES:
            sys.modules.setdefault(name, _NotLoaded(name))
    import mindnlp  # noqa: F401

    _honour_tensor_dtype()


def _honour_tensor_dtype() -> None:
    """``torch.tensor``/``torch.as_tensor`` of a tensor with a ``dtype`` convert it, as in PyTorch.

    mindtorch's ``tensor(data, dtype=...)`` ignores ``dtype`` when ``data`` is already a tensor, and its
    ``as_tensor`` goes through it. transformers relies on that conversion: Qwen2.5-VL's ``get_rope_index``
    casts each video's ``second_per_grid_t`` to int64 with ``torch.as_tensor`` before scaling its temporal
    positions, so under unpatched mindnlp a clip sampled at 4 fps (0.5 s per group) got positions 0, 1, ...
    where transformers on PyTorch gives 0, 0, ..., and different captions (tests/test_engine_qwen2vl.py).
    Idempotent."""
    import mindtorch

    original = mindtorch.tensor
    if getattr(original, "honours_dtype", False):
        return

    def tensor(data, *, dtype=None, device=None, requires_grad=False):
        if dtype is not None and isinstance(data, mindtorch.Tensor) and data.dtype != dtype:
            data = data.to(dtype)
        return original(data, dtype=dtype, device=device, requires_grad=requires_grad)

    tensor.honours_dtype = True
    mindtorch.tensor = tensor


def torch_dtype(name: str):
    import torch  # mindtorch once mindnlp is imported

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def own_parameters(model) -> None:
    """Replace each parameter's data by a clone, once, right after mindnlp's ``from_pretrained``.

    The tensors ``from_pretrained`` leaves behind are host-side buffers that the first op copies into
    MindSpore's memory while the host copy stays alive, so the first generate holds the weights twice
    (docs/BENCHMARKS.md, item 11: a 1.64 GiB model went from 2.30 to 3.96 GiB on its first forward and
    stayed at 2.56 GiB with the clone; Qwen2-VL-2B fp32 passed 17.5 GiB without it, 12.74 GiB with it).
    The values are unchanged (a copy), so captions are too."""
    import torch  # mindtorch once mindnlp is imported

    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()


def init_collective() -> None:
    """Join msrun's communication group (only the AllGather option needs it)."""
    setup_device()
    from mindspore.communication import init

    init()


def allgather_rows(rows: list[list[int]], width: int, pad_id: int) -> list[list[int]]:
    """AllGather fixed-width int32 rows from every rank (each rank must pass the same count).

    Rows are padded with ``pad_id`` to ``width``; the caller strips padding again.
    """
    import mindspore as ms
    import numpy as np

    arr = np.full((len(rows), width), pad_id, dtype=np.int32)
    for i, row in enumerate(rows):
        arr[i, : min(len(row), width)] = row[:width]
    gathered = ms.ops.AllGather()(ms.Tensor(arr)).asnumpy()
    return gathered.tolist()
