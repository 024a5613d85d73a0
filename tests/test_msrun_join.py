"""msrun's join loop: once the workers are up it runs under SCHED_IDLE, and still does its job.

msrun (MindSpore 2.7) waits for its workers in a loop that polls without sleeping. The hook moves msrun
alone to SCHED_IDLE after msrun logs that every process is spawned; the ranks keep the normal policy, and a
worker that fails still makes msrun stop the others and exit non-zero. Real msrun, trivial worker scripts.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from operators.msrun_cpu import CpuSampler
from operators.msrun_hook import MsrunError, MsrunHook, MsrunSpec, pick_free_port

pytestmark = pytest.mark.msrun

WORKER = """
import os, sys, time
if os.environ.get("MS_ROLE") == "MS_SCHED":
    sys.exit(0)
rank = int(os.environ["RANK_ID"])
print(f"rank {rank} up", flush=True)
if rank == 1 and os.environ.get("FAIL_RANK1"):
    time.sleep(4)
    sys.exit(3)
time.sleep(float(os.environ.get("WORKER_SECONDS", "8")))
"""


def _hook(tmp_path, name: str, env: dict, observer: CpuSampler | None = None, **spec) -> MsrunHook:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return MsrunHook(MsrunSpec(str(script), log_dir=str(tmp_path / name), master_port=pick_free_port(29700),
                               **spec), env, line_sink=lambda line: None, observer=observer)


def _policies(hook: MsrunHook, until: float) -> dict:
    """msrun's and the ranks' scheduling policies, seen while the job runs (after the join loop started)."""
    while time.monotonic() < until:
        if hook.proc is not None and hook.join_policy != "default":
            policies = []
            for proc in psutil.Process(hook.proc.pid).children(recursive=True):
                try:
                    if proc.environ().get("MS_ROLE") == "MS_WORKER":
                        policies.append(os.sched_getscheduler(proc.pid))
                except (psutil.Error, OSError):  # the scheduler process exits at once
                    continue
            if len(policies) == 2:
                return {"msrun": os.sched_getscheduler(hook.proc.pid), "ranks": sorted(policies)}
        time.sleep(0.2)
    return {}


def _run_watching(hook: MsrunHook) -> tuple[dict, BaseException | None]:
    seen: dict = {}
    watcher = threading.Thread(target=lambda: seen.update(_policies(hook, time.monotonic() + 120)), daemon=True)
    watcher.start()
    error = None
    try:
        hook.run()
    except MsrunError as err:
        error = err
    watcher.join(5)
    return seen, error


def test_join_loop_runs_idle_while_the_ranks_keep_the_normal_policy(tmp_path):
    cpu = CpuSampler()
    hook = _hook(tmp_path, "idle", {}, observer=cpu)
    seen, error = _run_watching(hook)
    assert error is None and hook.join_policy == "SCHED_IDLE"
    assert seen == {"msrun": os.SCHED_IDLE, "ranks": [os.SCHED_OTHER, os.SCHED_OTHER]}
    assert cpu.msrun_cpu_seconds > 0
    assert cpu.join_cpu_start is not None and cpu.join_cores is not None  # the join loop's start was seen


def test_without_idle_join_msrun_keeps_its_policy(tmp_path):
    hook = _hook(tmp_path, "busy", {"WORKER_SECONDS": "4"}, idle_join=False)
    hook.run()
    assert hook.join_policy == "default"


def test_a_failing_worker_still_stops_the_job_under_the_idle_join(tmp_path):
    hook = _hook(tmp_path, "fail", {"FAIL_RANK1": "1", "WORKER_SECONDS": "120"})
    started = time.monotonic()
    seen, error = _run_watching(hook)
    assert seen["msrun"] == os.SCHED_IDLE
    assert error is not None and "exited with code" in str(error)
    assert time.monotonic() - started < 60  # msrun saw rank 1 fail and stopped rank 0 (which sleeps 120 s)
    assert not [p for p in hook._tree.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
