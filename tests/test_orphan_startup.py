"""A rank never outlives msrun, even when msrun dies while the rank is still starting (issue 25 #11).

Real msrun (2 CPU workers) launched with the hook's own argv and environment. The ranks' S3 endpoint is a
closed port, so each rank sits in its first S3 call (the ``--skip_if_existing`` HEAD, retried for a minute and
a half): the start-up window an S3 outage opens. Before, PDEATHSIG was set only once that call returned, so
ranks whose msrun was SIGKILLed meanwhile were reparented to PID 1 and went on; now the entry script ties a
rank to msrun before anything slow, and exits at once if msrun is already gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from operators.msrun_hook import MsrunHook, MsrunSpec
from testkit.airflow_env import REPO, TINY_QWEN2VL
from testkit.ports import free_port
from testkit.process import alive, caption_processes, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.msrun]


def _ranks(msrun_pid: int) -> list[psutil.Process]:
    """The caption ranks under msrun (not its scheduler process: msrun sets RANK_ID for workers only)."""
    out = []
    for p in caption_processes(msrun_pid):
        try:
            if p.environ().get("RANK_ID") is not None and "msrun" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_ranks_die_with_msrun_killed_during_their_start_up(s3_server, tmp_path):
    env = {**s3_server.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens
           "CAPTION_S3_RETRY_SECONDS": "90"}
    spec = MsrunSpec(script=str(REPO / "captioning_core" / "caption_qwen2vl.py"),
                     script_args=["s3://bucket/p/meta.csv", "--pretrained_model_name_or_path", str(TINY_QWEN2VL),
                                  "--device_target", "CPU", "--skip_if_existing"],
                     log_dir=str(tmp_path / "log"), master_port=free_port())
    hook = MsrunHook(spec, env)
    msrun = subprocess.Popen(hook.build_argv(), env=hook.build_env(), cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks: list[psutil.Process] = []
    try:
        ranks = wait_for(lambda: len(_ranks(msrun.pid)) == 2 and _ranks(msrun.pid), 120, "both ranks to start")
        logs = sorted((tmp_path / "log").glob("worker_*.log"))
        wait_for(lambda: all("retrying" in p.read_text(errors="replace") for p in logs) and len(logs) == 2, 120,
                 "both ranks to be retrying their first S3 call")
        os.kill(msrun.pid, signal.SIGKILL)
        msrun.wait(timeout=10)
        killed_at = time.monotonic()
        wait_for(lambda: not alive(ranks), 15, "the ranks to die with msrun")
        assert time.monotonic() - killed_at < 15
    finally:
        for p in [*alive(ranks), *_ranks(msrun.pid)]:
            try:
                p.kill()
            except psutil.Error:
                pass
        if msrun.poll() is None:
            msrun.kill()
            msrun.wait(timeout=10)
