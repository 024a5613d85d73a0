"""Run a benchmark's child in a fresh interpreter and read back the one JSON line it prints last.

A child is a module of this package (``benchmarks.child_*``), started as
``python -m benchmarks.child_x '<json keyword arguments>'``. A fresh process per measurement is the point:
its timings include the imports a rank pays, its peak RSS (VmHWM) is its own, and real PyTorch and mindtorch
(which cannot share a process) each get one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from testkit.paths import REPO


def argv(module: str, kwargs: dict) -> list[str]:
    """The command line that runs ``benchmarks.<module>`` with ``kwargs`` (JSON) in this interpreter."""
    return [sys.executable, "-m", f"benchmarks.{module}", json.dumps(kwargs)]


def run_child(module: str, kwargs: dict, env: dict | None = None, timeout: float = 1800) -> dict:
    """Run the child ``benchmarks.<module>`` with ``kwargs`` in a fresh interpreter; return its last JSON line."""
    proc = subprocess.run(argv(module, kwargs), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child_watched(module: str, kwargs: dict, cap_gib: float, floor_gib: float = 3.0, poll: float = 2.0) -> dict:
    """``run_child`` for a child that may outgrow a shared machine: it is stopped (SIGKILL, this child only) when
    its RSS passes ``cap_gib`` or the machine's available memory falls below ``floor_gib``. Returns the child's
    last JSON line, plus ``stopped_at_gib`` (its RSS then) if it was stopped."""
    from benchmarks.realsize import mem_available_gib

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv(module, kwargs), stdout=out, stderr=err, text=True, cwd=REPO)
        stopped, rss = None, 0.0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 2**20
            except (OSError, StopIteration):
                pass
            if rss > cap_gib or mem_available_gib() < floor_gib:
                stopped = rss
                proc.kill()
                proc.wait()
                break
            time.sleep(poll)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if stopped is None and proc.returncode != 0:
            raise RuntimeError(err.read()[-3000:])
    got = json.loads(lines[-1]) if lines else {"phase": "starting"}
    if stopped is not None:
        got["stopped_at_gib"] = stopped
    return got
