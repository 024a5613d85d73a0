"""Killing a caption task the ways Airflow does leaves no msrun or worker process behind, the ranks stop
gracefully (journaling what is done), and the next try resumes with nothing lost or duplicated.

- execution_timeout: the real task runner (``airflow dags test``) raises AirflowTaskTimeout from SIGALRM while
  msrun runs, then calls on_kill;
- the task runner's SIGTERM handler (what the supervisor sends when the TI is marked failed or the worker
  stops): SIGTERM to the task process while msrun runs;
- SIGKILL of the task process (no cleanup code runs): the PR_SET_PDEATHSIG chain.
The REST-API "mark failed" path under a real scheduler and supervisor is in tests/test_ui.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from testkit.airflow_env import REPO, TINY_CAPTION_OPTIONS, TINY_QWEN2VL, AirflowEnv
from testkit.clips import ensure_clip
from testkit.demo_clips import PARTITION_SPECS, SMALL_SPECS
from testkit.partition import Row, meta_csv, upload_partition
from testkit.process import alive, wait_for
from testkit.profile import TINY

pytestmark = [pytest.mark.integration, pytest.mark.msrun]

SCRIPT = str(REPO / "captioning_core" / "caption_qwen2vl.py")
DAGS = Path(__file__).resolve().parent / "airflow_dags"
DATE = "2026-11-23"
FERNET = "kill-drill-fernet-key-that-must-never-reach-a-rank"
GRACEFUL = "graceful SIGTERM stop"


@pytest.fixture
def local_partition(tmp_path):
    clips = [ensure_clip(spec, tmp_path / "clips") for spec in SMALL_SPECS]
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv([Row(str(p), None) for p in clips]))
    return meta


def _script_args(meta) -> list[str]:
    return [str(meta), "--pretrained_model_name_or_path", str(TINY_QWEN2VL), "--device_target", "CPU",
            *TINY.args(), "--max_new_tokens", "6"]


def _ranks(root_pid: int) -> list[psutil.Process]:
    """The rank processes under ``root_pid`` (msrun's scheduler process runs the script too; it is left out)."""
    out = []
    try:
        for p in psutil.Process(root_pid).children(recursive=True):
            try:
                if "RANK_ID" in p.environ() and p.environ().get("MS_ROLE") != "MS_SCHED":
                    out.append(p)
            except psutil.Error:
                continue
    except psutil.NoSuchProcess:
        pass
    return out


def _assert_all_gone(procs: list[psutil.Process], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(procs)
    assert not left, f"processes survived: {[(p.pid, p.cmdline()) for p in left]}"


class _TreeSampler:
    """Every process started under this one while the block runs, and the environment of each rank."""

    def __enter__(self):
        self._before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. the S3 server
        self.procs: dict[int, psutil.Process] = {}
        self.rank_envs: dict[int, dict[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            for child in psutil.Process().children(recursive=True):
                if child.pid in self._before:
                    continue
                try:
                    self.procs.setdefault(child.pid, child)
                    if child.pid not in self.rank_envs and "RANK_ID" in (env := child.environ()):
                        self.rank_envs[child.pid] = env
                except psutil.Error:
                    continue

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _rank_logs(root: Path) -> dict[str, dict[str, str]]:
    """try directory -> worker log name -> text."""
    out: dict[str, dict[str, str]] = {}
    for log in sorted(root.rglob("worker_*.log")):
        out.setdefault(log.parent.name, {})[log.name] = log.read_text(errors="replace")
    return out


def _assert_output(client, uri: str, rows) -> None:
    import io

    import pandas as pd

    bucket, _, key = uri[len("s3://"):].partition("/")
    out = pd.read_csv(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read()), dtype=str,
                      keep_default_na=False)
    assert out["path"].tolist() == [r.path for r in rows]  # every row once, in input order
    assert out["caption_status"].tolist() == ["ok"] * len(rows)
    assert out["text"].tolist() == [r.expected_caption for r in rows]


def _done_in_try1(logs: dict[str, dict[str, str]]) -> int:
    return _done_in_try2({"try2": logs["try1"]})


def _done_in_try2(logs: dict[str, dict[str, str]]) -> int:
    lines = [ln for text in logs["try2"].values() for ln in text.splitlines() if "already done" in ln]
    assert len(lines) == 2, lines
    return sum(int(ln.split(" owned, ")[1].split(" already done")[0]) for ln in lines)


@pytest.fixture
def kill_partition(s3_server, s3_bucket, tmp_path_factory):
    directory = tmp_path_factory.mktemp("kill-clips")
    clips = [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS[:6]]
    meta, rows = upload_partition(s3_server.client(), s3_bucket, "kill", clips)
    return meta, rows, meta.replace("meta.csv", "captions.csv")


def _drill_env(s3_server, home: Path, **extra: str) -> AirflowEnv:
    env = AirflowEnv(home, s3_server.env(), "postgresql://unused", dags_folder=DAGS,
                     extra={"AIRFLOW__CORE__FERNET_KEY": FERNET, "CAPTION_RETRIES": "1", **extra})
    env.migrate()
    return env


def _conf(meta: str, output: str) -> dict:
    # one video per batch, so each rank journals batch by batch and a stop loses at most one video's work
    return {"meta_path": meta, "output_uri": output, "caption_options": {**TINY_CAPTION_OPTIONS, "bs": 1}}


def _check_killed_try(env: AirflowEnv, sampler: _TreeSampler, proc, client, output: str, rows) -> None:
    """Shared checks after try 1 was stopped while msrun ran and try 2 finished."""
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert [(t, s) for _, t, s in env.task_tries("caption_drill", "caption")] == [(1, "failed"), (2, "success")]
    text = proc.stdout + proc.stderr
    assert "TimeoutExpired" not in text
    logs = _rank_logs(env.msrun_log_root)
    assert set(logs) == {"try1", "try2"}
    for name, log in logs["try1"].items():  # each rank stopped cleanly, between batches
        assert "SIGTERM received" in log and GRACEFUL in log, (name, log[-3000:])
    # nothing of try 1's tree (msrun, its scheduler process, the ranks) or try 2's is left
    _assert_all_gone(list(sampler.procs.values()))
    _assert_output(client, output, rows)
    [(_, _, result)] = env.task_results("caption_drill", "caption")
    assert result["skipped"] == _done_in_try2(logs)  # try 2 captioned only what try 1 had not journaled
    assert (result["rows"], result["captioned"], result["failed"]) == (len(rows), len(rows), 0)
    _assert_rank_envs(env, sampler)


def _assert_rank_envs(env: AirflowEnv, sampler: _TreeSampler) -> None:
    """The ranks' environment: no Airflow setting, Fernet key, DB URI or connection; S3 settings from the
    connection only."""
    secret = env.s3_env["AWS_SECRET_ACCESS_KEY"]
    assert len(sampler.rank_envs) >= 4, "both tries' two ranks were sampled"
    for pid, rank_env in sampler.rank_envs.items():
        assert not [k for k in rank_env if k.startswith(("AIRFLOW__", "AIRFLOW_CONN", "AIRFLOW_HOME"))], pid
        assert not [k for k, v in rank_env.items() if FERNET in v or "sqlite:" in v or "postgresql:" in v], pid
        assert [k for k, v in rank_env.items() if secret in v] == ["AWS_SECRET_ACCESS_KEY"], pid


@pytest.mark.parametrize("stop", ["execution_timeout", "shard_budget"])
def test_execution_timeout_stops_the_ranks_gracefully_and_the_next_attempt_resumes(s3_server, s3_bucket, tmp_path,
                                                                                   tmp_path_factory, stop):
    """execution_timeout applies to every try, so the attempt after the timeout is a second run of the same
    partition without one (what a retry with a longer timeout, or the next schedule, does). ``shard_budget``:
    the same stop by the operator's own budget derived from the shard (``seconds_per_video`` x 24 rows +
    ``budget_base`` = 45 s, issue 25 #2) instead of Airflow's timeout."""
    directory = tmp_path_factory.mktemp("timeout-clips")
    base = [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS[:6]]
    clips = [(path, spec, kind) for _ in range(4) for path, spec, kind in base]  # 24 rows: too many for 45 s
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "timeout", clips)
    output = meta.replace("meta.csv", "captions.csv")
    # Each rank pauses 15 s after each journaled batch, so the timeout lands while the ranks still have rows
    # left, whether this machine is quiet (try 1 would otherwise finish first) or loaded.
    limit = ({"CAPTION_EXECUTION_TIMEOUT": "45"} if stop == "execution_timeout" else
             {"CAPTION_SECONDS_PER_VIDEO": "1", "CAPTION_BUDGET_BASE": "21"})
    first = _drill_env(s3_server, tmp_path / "airflow-1", CAPTION_KILL_GRACE="30", CAPTION_RETRIES="0",
                       CAPTION_FAULTS="slow@0:15,slow@1:15", **limit)
    second = _drill_env(s3_server, tmp_path / "airflow-2")
    started = time.monotonic()
    with _TreeSampler() as sampler:
        proc1 = first.dags_test("caption_drill", DATE, _conf(meta, output))
        took = time.monotonic() - started
        proc2 = second.dags_test("caption_drill", DATE, _conf(meta, output))
    print(f"timeout drill: attempt 1 stopped after {took:.0f}s, total {time.monotonic() - started:.0f}s")
    text1 = proc1.stdout + proc1.stderr
    why = ("AirflowTaskTimeout" if stop == "execution_timeout" else
           "the shard's time budget ran out: 24 videos x 1 s + 21 s = 45 s")
    assert proc1.returncode != 0 and why in text1 and "TimeoutExpired" not in text1
    assert [(t, s) for _, t, s in first.task_tries("caption_drill", "caption")] == [(1, "failed")]
    logs1 = _rank_logs(first.msrun_log_root)
    assert list(logs1) == ["try1"]
    for name, log in logs1["try1"].items():  # each rank stopped cleanly, between batches
        assert "SIGTERM received" in log and GRACEFUL in log, (name, log[-3000:])
    assert proc2.returncode == 0, proc2.stdout[-5000:] + proc2.stderr[-3000:]
    _assert_all_gone(list(sampler.procs.values()))  # nothing of either attempt's tree is left
    _assert_output(client, output, rows)
    logs2 = _rank_logs(second.msrun_log_root)
    [(_, _, result)] = second.task_results("caption_drill", "caption")
    assert result["skipped"] == _done_in_try1(logs2)  # attempt 2 captioned only what attempt 1 had not journaled
    assert (result["rows"], result["captioned"], result["failed"]) == (len(rows), len(rows), 0)
    _assert_rank_envs(first, sampler)


def test_sigterm_to_the_task_runner_stops_the_ranks_gracefully_and_the_retry_resumes(s3_server, kill_partition,
                                                                                      tmp_path):
    """What the supervisor does when the TI is marked failed or the worker shuts down: SIGTERM to the task
    process, whose task runner calls on_kill from its signal handler while execute() waits on msrun."""
    meta, rows, output = kill_partition
    env = _drill_env(s3_server, tmp_path / "airflow", CAPTION_FAULTS="slow@0:3/try1,slow@1:3/try1",
                     CAPTION_KILL_GRACE="30")
    cmd = [str(Path(sys.executable).with_name("airflow")), "dags", "test", "caption_drill", DATE, "-c",
           json.dumps(_conf(meta, output))]
    client = s3_server.client()
    bucket, _, key = output[len("s3://"):].partition("/")
    with _TreeSampler() as sampler:
        task = subprocess.Popen(cmd, env=env.env(), cwd=env.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            # once both ranks have journaled something, the "supervisor" sends SIGTERM
            wait_for(lambda: len(client.list_objects_v2(Bucket=bucket, Prefix=f"{key}.parts/")
                                  .get("Contents", [])) >= 2, 400, "journal parts of try 1")
            os.kill(task.pid, signal.SIGTERM)
            out, _ = task.communicate(timeout=600)
        finally:
            if task.poll() is None:
                task.kill()
    proc = subprocess.CompletedProcess(cmd, task.returncode, out, "")
    assert "msrun was stopped: the task was killed" in out
    _check_killed_try(env, sampler, proc, client, output, rows)


DRIVER = """
import json, sys
sys.path.insert(0, {plugins!r})
from operators.msrun_hook import MsrunHook, MsrunSpec
spec = MsrunSpec(**json.loads(sys.argv[1]))
MsrunHook(spec, {{"CAPTION_FAULTS": "slow@0:120,slow@1:120"}}, allow_fault_injection=True).run()
"""


def test_sigkill_of_the_task_process_takes_msrun_and_workers_down(local_partition, tmp_path):
    from operators.msrun_hook import MsrunHook, MsrunSpec, pick_free_port

    spec = {"script": SCRIPT, "script_args": _script_args(local_partition), "log_dir": str(tmp_path / "log"),
            "master_port": pick_free_port(29100)}
    task = subprocess.Popen([sys.executable, "-c", DRIVER.format(plugins=str(REPO / "plugins")), json.dumps(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(_ranks(task.pid)) == 2, 90, "2 workers")
        tree = psutil.Process(task.pid).children(recursive=True)
        time.sleep(2)
        os.kill(task.pid, signal.SIGKILL)  # no on_kill, no cleanup code runs in the task process
        task.wait(timeout=10)
        _assert_all_gone(tree)
    finally:
        if task.poll() is None:
            task.kill()
    # the next attempt finishes the partition: every row once, each caption right
    import pandas as pd

    spec = MsrunSpec(SCRIPT, _script_args(local_partition), log_dir=str(tmp_path / "log-next"),
                     master_port=pick_free_port(29200))
    MsrunHook(spec, {}, line_sink=lambda line: None).run()
    out = pd.read_csv(local_partition.with_name("meta_caption_qwen2vl.csv"), dtype=str, keep_default_na=False)
    assert out["path"].tolist() == pd.read_csv(local_partition, dtype=str)["path"].tolist()
    assert out["caption_status"].tolist() == ["ok"] * len(SMALL_SPECS)
    assert out["text"].tolist() == [s.caption for s in SMALL_SPECS]
