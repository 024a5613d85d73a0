"""The demo (`make demo`) stops everything it started when it is stopped with SIGTERM mid-run (issue 27: a
review once found SeaweedFS and PostgreSQL still running after a SIGTERM).

The real demo in a subprocess: SIGTERM once the DAG run is under way (its log says so), then every process it
started (S3 server, PostgreSQL, Airflow's scheduler, dag-processor, triggerer and API server, any task, msrun or
rank) must be gone within seconds.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

from testkit.paths import REPO
from testkit.process import alive

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_sigterm_mid_run_stops_every_process_the_demo_started(tmp_path):
    out = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "demo", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen: dict[int, psutil.Process] = {}
    lines = []
    try:
        deadline = time.monotonic() + 300
        for line in demo.stdout:
            lines.append(line)
            if "running the video_curation DAG" in line or time.monotonic() > deadline:
                break
        assert any("running the video_curation DAG" in ln for ln in lines), "".join(lines)[-3000:]
        time.sleep(8)  # the run is scheduled: tasks start under the scheduler
        for child in psutil.Process(demo.pid).children(recursive=True):
            seen[child.pid] = child
        names = " ".join(_cmdline(p) for p in seen.values())
        assert "weed" in names and "postgres" in names and "scheduler" in names and "api_server" in names, names
        demo.send_signal(signal.SIGTERM)
        rest = demo.communicate(timeout=120)[0]
    finally:
        if demo.poll() is None:  # a failed check above: stop it the way that lets it stop its servers
            demo.send_signal(signal.SIGTERM)
            try:
                demo.wait(timeout=120)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
    try:
        assert demo.returncode == 128 + signal.SIGTERM, rest[-3000:]
        deadline = time.monotonic() + 30
        while alive(list(seen.values())) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = alive(list(seen.values()))
        assert not left, [(p.pid, _cmdline(p)) for p in left]
    finally:
        for proc in alive(list(seen.values())):  # nothing may outlive the test, even when it fails
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()[:3])
    except psutil.Error:
        return ""
