"""Read a safetensors checkpoint (one file, or shards named by ``model.safetensors.index.json``) tensor by tensor.

The file is memory-mapped and each tensor is viewed in place, so the only copy is the one made when it becomes
a MindSpore Parameter at the run dtype (the eager path's first forward copying every weight again, BENCHMARKS
item 11, has no counterpart here). bfloat16 is widened by a bit shift (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class Checkpoint:
    """Names and tensors of a safetensors checkpoint directory, read lazily."""

    def __init__(self, model_dir: str) -> None:
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            files = {name: os.path.join(model_dir, f) for name, f in weight_map.items()}
        else:
            single = os.path.join(model_dir, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
            files = {name: single for name in _header(single)[0] if name != "__metadata__"}
        self._files = files
        self._maps: dict[str, tuple[dict, np.memmap]] = {}

    def names(self) -> list[str]:
        return sorted(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view (bfloat16 widened to float32)."""
        path = self._files[name]
        if path not in self._maps:
            header, start = _header(path)
            self._maps[path] = (header, np.memmap(path, dtype=np.uint8, mode="r", offset=start))
        header, data = self._maps[path]
        meta = header[name]
        begin, end = meta["data_offsets"]
        arr = data[begin:end].view(_NP[meta["dtype"]]).reshape(meta["shape"])
        if meta["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr


def _header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(size)), 8 + size


def parameter(array: np.ndarray, name: str, dtype: str):
    """A frozen MindSpore Parameter holding ``array`` at the run dtype."""
    from mindspore import Parameter, Tensor

    from captioning_core.engine.device import ms_dtype

    return Parameter(Tensor(np.ascontiguousarray(array, dtype=np.float32), dtype=ms_dtype(dtype)),
                     name=name, requires_grad=False)


#: transformers >= 4.52 saves ``model.visual.*`` / ``model.language_model.*``; original checkpoints store
#: ``visual.*`` / ``model.*``. Names are asked for in the original layout and found in either.
_NEW_LAYOUT = (("visual.", "model.visual."), ("model.", "model.language_model."))


class Loader:
    """Parameters by checkpoint name, at the run dtype, each made once (cells that share a weight share it)."""

    def __init__(self, ck: Checkpoint, dtype: str) -> None:
        self.ck, self.dtype = ck, dtype
        self._made: dict[str, object] = {}

    def resolve(self, name: str) -> str:
        if name in self.ck:
            return name
        for old, new in _NEW_LAYOUT:
            if name.startswith(old) and new + name[len(old):] in self.ck:
                return new + name[len(old):]
        raise KeyError(f"checkpoint has no tensor {name!r}")

    def has(self, name: str) -> bool:
        try:
            self.resolve(name)
        except KeyError:
            return False
        return True

    def __call__(self, name: str, transform=None):
        """The Parameter of tensor ``name`` (optionally reshaped by ``transform``)."""
        if name not in self._made:
            array = self.ck.get(self.resolve(name))
            self._made[name] = parameter(transform(array) if transform else array, name, self.dtype)
        return self._made[name]

    def cat(self, names: list[str], name: str):
        """One Parameter holding several tensors concatenated on axis 0 (fused q/k/v or gate/up weights)."""
        if name not in self._made:
            self._made[name] = parameter(np.concatenate([self.ck.get(self.resolve(n)) for n in names]), name,
                                         self.dtype)
        return self._made[name]
