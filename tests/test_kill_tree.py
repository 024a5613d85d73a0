"""Killing a caption task leaves no msrun or worker process behind (on_kill, and SIGKILL of the task)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from operators.msrun_hook import MsrunError, MsrunHook, MsrunSpec, pick_free_port
from testkit.airflow_env import REPO, TINY_QWEN2VL
from testkit.clips import ensure_clip
from testkit.demo_clips import SMALL_SPECS
from testkit.partition import Row, meta_csv

pytestmark = [pytest.mark.integration, pytest.mark.msrun]

SCRIPT = str(REPO / "captioning_core" / "caption_qwen2vl.py")


@pytest.fixture
def local_partition(tmp_path):
    clips = [ensure_clip(spec, tmp_path / "clips") for spec in SMALL_SPECS]
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv([Row(str(p), None) for p in clips]))
    return meta


def _script_args(meta) -> list[str]:
    return [str(meta), "--pretrained_model_name_or_path", str(TINY_QWEN2VL), "--device_target", "CPU",
            "--height", "112", "--width", "112", "--fps", "2", "--min_pixels", "3136", "--max_new_tokens", "6"]


def _workers(root_pid: int) -> list[psutil.Process]:
    """The rank processes under ``root_pid`` (msrun's scheduler process runs the script too; it is left out)."""
    out = []
    try:
        for p in psutil.Process(root_pid).children(recursive=True):
            try:
                if any("caption_qwen2vl.py" in part for part in p.cmdline()) and "RANK_ID" in p.environ():
                    out.append(p)
            except psutil.Error:
                continue
    except psutil.NoSuchProcess:
        pass
    return out


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_all_gone(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes survived: {[(p, psutil.Process(p).cmdline()) for p in alive]}")


def test_on_kill_stops_msrun_and_every_worker(local_partition, tmp_path):
    spec = MsrunSpec(SCRIPT, _script_args(local_partition), log_dir=str(tmp_path / "log"),
                     master_port=pick_free_port(29000))
    hook = MsrunHook(spec, {"CAPTION_FAULTS": "slow@0:120,slow@1:120"}, kill_grace=5)
    errors = []
    runner = threading.Thread(target=lambda: errors.append(_run(hook)))
    runner.start()
    _wait_for(lambda: hook.proc is not None, 30, "msrun to start")
    workers = _wait_for(lambda: len(_workers(hook.proc.pid)) == 2 and _workers(hook.proc.pid), 60, "2 workers")
    time.sleep(2)
    tree = [hook.proc.pid, *hook.descendants()]
    hook.kill()  # what AscendCaptionOperator.on_kill does
    runner.join(timeout=60)
    assert not runner.is_alive()
    assert isinstance(errors[0], MsrunError)
    _assert_all_gone(tree + [w.pid for w in workers])
    _next_attempt_completes(local_partition, tmp_path)


def _next_attempt_completes(meta, tmp_path) -> None:
    """After the kill, a plain next attempt finishes the partition: every row once, each caption right."""
    import pandas as pd

    spec = MsrunSpec(SCRIPT, _script_args(meta), log_dir=str(tmp_path / "log-next"),
                     master_port=pick_free_port(29200))
    MsrunHook(spec, {}, line_sink=lambda line: None).run()
    out = pd.read_csv(meta.with_name("meta_caption_qwen2vl.csv"), dtype=str, keep_default_na=False)
    assert out["path"].tolist() == pd.read_csv(meta, dtype=str)["path"].tolist()
    assert out["caption_status"].tolist() == ["ok"] * len(SMALL_SPECS)
    assert out["text"].tolist() == [spec.caption for spec in SMALL_SPECS]


def _run(hook):
    try:
        hook.run()
    except Exception as err:
        return err
    return None


DRIVER = """
import json, sys
sys.path.insert(0, {plugins!r})
from operators.msrun_hook import MsrunHook, MsrunSpec
spec = MsrunSpec(**json.loads(sys.argv[1]))
MsrunHook(spec, {{"CAPTION_FAULTS": "slow@0:120,slow@1:120"}}).run()
"""


def test_sigkill_of_the_task_process_takes_msrun_and_workers_down(local_partition, tmp_path):
    import json

    spec = {"script": SCRIPT, "script_args": _script_args(local_partition), "log_dir": str(tmp_path / "log"),
            "master_port": pick_free_port(29100)}
    task = subprocess.Popen([sys.executable, "-c", DRIVER.format(plugins=str(REPO / "plugins")), json.dumps(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers = _wait_for(lambda: len(_workers(task.pid)) == 2 and _workers(task.pid), 90, "2 workers")
        tree = [p.pid for p in psutil.Process(task.pid).children(recursive=True)]
        time.sleep(2)
        os.kill(task.pid, signal.SIGKILL)  # no on_kill, no cleanup code runs in the task process
        task.wait(timeout=10)
        _assert_all_gone(tree + [w.pid for w in workers])
        _next_attempt_completes(local_partition, tmp_path)
    finally:
        if task.poll() is None:
            task.kill()
