"""MindSpore/mindnlp process setup for one rank: device, import order, dtypes, the AllGather option, and
the rank's graceful stop.

Graceful stop: when the task is killed (``on_kill``, ``execution_timeout``, the task marked failed), the
operator's hook sends SIGTERM to every rank, and SIGKILL only after a grace period. A rank's SIGTERM
handler only sets a flag (a handler runs between bytecodes of the main thread, which may be deep inside
MindSpore); the runner checks the flag before each batch and stops taking new ones, and its journal
writer's ``finally`` flushes what is done, so the next attempt resumes from there. A batch in flight may take
longer than the grace period (Airflow's supervisor SIGKILLs 5 s after its own SIGTERM), so a second SIGTERM
(the hook sends it halfway through its grace period) abandons that batch at once: the handler raises, and
the same ``finally`` blocks flush the batches already done. The rank then exits with
``EXIT_STOPPED`` (143, as a SIGTERM death would) so nothing mistakes a stopped rank for a finished one.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import types

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (msrun) dies, so no rank outlives its launcher.

    msrun starts each worker in a process group of its own, out of reach of a group kill aimed at msrun;
    this closes that gap for every way msrun can die (including SIGKILL).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - non-glibc platforms
        log.warning("could not set PR_SET_PDEATHSIG; this rank may outlive msrun")


EXIT_STOPPED = 128 + signal.SIGTERM
_stop = {"requested": False, "raised": False}


class GracefulStop(SystemExit):
    """Raised between batches after SIGTERM; exits the rank with ``EXIT_STOPPED`` once ``finally`` blocks
    (the journal writer's close, the decode pool's shutdown) have run."""

    def __init__(self) -> None:
        super().__init__(EXIT_STOPPED)


def install_sigterm_handler() -> None:
    """On SIGTERM, ask the rank to stop before its next batch (see the module docstring)."""

    def _on_term(signum, frame) -> None:
        if not _stop["requested"]:
            _stop["requested"] = True
            log.warning("SIGTERM received: stopping after the batch in flight")
        elif not _stop["raised"]:  # a second SIGTERM: abandon the batch in flight (not once already exiting)
            _stop["raised"] = True
            log.warning("graceful SIGTERM stop: second SIGTERM, the batch in flight is abandoned; finished rows "
                        "are journaled, the rest is left for the next attempt (exit %d)", EXIT_STOPPED)
            raise GracefulStop()

    signal.signal(signal.SIGTERM, _on_term)


def raise_if_stopped() -> None:
    """Between batches: after SIGTERM, stop taking work (``GracefulStop``; the caller's ``finally`` flushes)."""
    if _stop["requested"] and not _stop["raised"]:
        _stop["raised"] = True
        log.warning("graceful SIGTERM stop: no new batch taken; finished rows are journaled, the rest is left "
                    "for the next attempt (exit %d)", EXIT_STOPPED)
        raise GracefulStop()


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


def torch_dtype(name: str):
    import torch  # mindtorch once mindnlp is imported

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


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
