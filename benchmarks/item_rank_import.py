"""Item 12: a rank's start-up, ``runtime.import_mindnlp()`` vs a plain ``import mindnlp``, in fresh
interpreters (``benchmarks.child_rank_import``)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.children import run_child
from benchmarks.common import report


def bench_rank_import(work: Path, rounds: int = 3) -> None:
    """What each rank pays before its first line of work: ``runtime.import_mindnlp()`` (which leaves out
    mindnlp's diffusers port) vs a plain ``import mindnlp``, in fresh interpreters, the two alternated."""
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(rounds):
        for skip in (False, True):
            runs[skip].append(run_child("child_rank_import", {"skip": skip}))
    med = {skip: sorted(r["seconds"] for r in rs)[len(rs) // 2] for skip, rs in runs.items()}
    assert not any(r["diffusers"] for r in runs[True]) and all(r["diffusers"] for r in runs[False])
    report("12 a rank's mindnlp import: `runtime.import_mindnlp()` (diffusers port left out) vs `import mindnlp`",
           f"{med[True]:.1f} s vs {med[False]:.1f} s ({med[False] / med[True]:.1f}x; medians of {rounds}, "
           f"alternated)", "report", None)
