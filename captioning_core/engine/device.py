"""Device choices for the compiled engine, in one place: the jit level, the run dtype, the attention op.

CPU is what this project tests. On Ascend the same graphs run; the one choice that would differ there is the
attention op: MindSpore ships a fused ``mindspore.ops.flash_attention_score`` (Ascend only; layout "BNSD",
an additive or boolean ``attn_mask``, and for the vision tower's block-diagonal mask ``actual_seq_qlen`` /
``actual_seq_kvlen`` instead of a dense mask). It is named here and not yet wired into the cells, since no test
here could exercise it; ``attention="matmul"`` (two batched matmuls around a softmax) is the tested path.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "float16", "bfloat16")
JIT_LEVELS = ("O0", "O1")


@dataclass(frozen=True)
class DeviceChoice:
    target: str = "CPU"          # "CPU" | "Ascend"
    dtype: str = "float32"       # the run dtype of weights, activations and the KV cache
    jit_level: str = "O0"        # O1 (kernel fusion) measured no faster than O0 on CPU (probe graph_decode)
    attention: str = "matmul"    # "matmul" (tested) | "flash" (Ascend's flash_attention_score: documented only)

    def __post_init__(self) -> None:
        if self.target not in ("CPU", "Ascend"):
            raise ValueError(f"device target must be CPU or Ascend, got {self.target!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.jit_level not in JIT_LEVELS:
            raise ValueError(f"jit level must be one of {JIT_LEVELS}, got {self.jit_level!r}")
        if self.attention != "matmul":
            raise ValueError(f"attention {self.attention!r} is not implemented; only 'matmul' is")


def choose(target: str = "CPU", dtype: str = "float32") -> DeviceChoice:
    """The engine's choice for a device target and run dtype (the same matmul attention on both for now)."""
    return DeviceChoice(target=target, dtype=dtype)


def ms_dtype(name: str):
    import mindspore as ms

    return {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[name]


def activate(choice: DeviceChoice) -> None:
    """Select the device. The cells are compiled with ``mindspore.jit``, so the process may stay in PyNative
    (what mindnlp needs if both engines share a process)."""
    import mindspore as ms

    ms.set_device(choice.target)


def compile_cell(cell, choice: DeviceChoice):
    """A Cell compiled from its source (AST capture). Bytecode capture was measured to fall back silently and
    give wrong tokens from the second decode step, so it is not offered."""
    import mindspore as ms

    return ms.jit(cell, capture_mode="ast", jit_level=choice.jit_level)
