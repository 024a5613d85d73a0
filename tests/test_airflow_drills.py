"""Reliability and security drills driven through Airflow itself (`airflow dags test`, real msrun, SeaweedFS).

The DAG is tests/airflow_dags/caption_drill.py (testkit/drill_dag.py): one AscendCaptionOperator whose every
templated field comes from the run's params, so each drill controls the task from outside exactly as a user would.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testkit.drill_dag import DAG_ID, DATE, drill_conf, rank_lines
from testkit.outputs import assert_all_captioned, read_output
from testkit.partition import upload_partition
from testkit.paths import TINY_QWEN2VL

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]


def test_rank_sigkill_then_the_airflow_retry_resumes(make_drill_env, s3_server, s3_bucket, drill_clips):
    """Drill 1: rank 1 SIGKILLs itself in try 1; Airflow retries; try 2 skips every journaled row."""
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "drill-retry", drill_clips)
    output = meta.replace("meta.csv", "captions.csv")
    env = make_drill_env(CAPTION_FAULTS="sigkill@1:2/try1", CAPTION_RETRIES="1")
    proc = env.dags_test(DAG_ID, DATE, drill_conf(meta, output))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]

    assert [(t, s) for _, t, s in env.task_tries(DAG_ID, "caption")] == [(1, "failed"), (2, "success")]
    assert_all_captioned(read_output(client, output), rows)

    # Try 1's ranks: rank 1 was killed after journaling its first batch. Try 2's ranks report how many rows
    # they found done; they captioned only the rest, and the task's XCom says the same.
    plans = rank_lines(env.msrun_log_root, "already done")
    assert set(plans) == {"try1", "try2"}
    done = sum(int(line.split(" owned, ")[1].split(" already done")[0]) for line in plans["try2"])
    todo = sum(int(line.split("already done, ")[1].split(" to caption")[0]) for line in plans["try2"])
    assert done >= 2 and done + todo == len(rows), plans["try2"]
    [(_, _, result)] = env.task_results(DAG_ID, "caption")
    assert (result["rows"], result["captioned"], result["failed"], result["launched"]) == (len(rows), len(rows),
                                                                                        0, True)
    assert result["skipped"] == done
    # try 2's own performance figures, as the operator returns them
    assert 0 < result["model_busy"] <= 1 and result["rows_per_second"] > 0
    assert result["decode_seconds_per_row"] > 0 and result["input_wait_seconds"] >= 0
    assert result["output_tokens_per_row"] > 0 and len(result["output_tokens_per_second_per_rank"]) == 2
    assert any(tps for tps in result["output_tokens_per_second_per_rank"])  # a rank may have had none left


def test_two_attempts_at_once_give_one_result_and_caption_once(make_drill_env, s3_server, s3_bucket, drill_clips):
    """Drill 5: two Airflow deployments run the same partition at the same moment (e.g. a zombie and its
    retry). The lease admits one; the other waits without its pool slot (rescheduled, issue 25 #13: before,
    it slept in its slot for up to lease_wait), finds the output, and launches nothing, in its first try."""
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "drill-twice", drill_clips)
    output = meta.replace("meta.csv", "captions.csv")
    # rank 0 pauses after each batch so the first attempt is surely still running when the second looks
    envs = [make_drill_env(f"airflow-{i}", CAPTION_FAULTS="slow@0:2") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda env: env.dags_test(DAG_ID, DATE, drill_conf(meta, output)), envs))
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]

    results = [env.task_results(DAG_ID, "caption")[0][2] for env in envs]
    assert sorted(r["launched"] for r in results) == [False, True]
    for result in results:
        assert (result["output"], result["rows"], result["captioned"]) == (output, len(rows), len(rows))
    launched = [env for env, r in zip(envs, results, strict=True) if r["launched"]]
    waited = [proc for proc, r in zip(procs, results, strict=True) if not r["launched"]][0]
    waited_log = waited.stdout + waited.stderr
    assert "rescheduled to look again in 3s, its pool slot released" in waited_log
    assert "output exists, nothing to launch" in waited_log
    waiter = [env for env, r in zip(envs, results, strict=True) if not r["launched"]][0]
    # rescheduled, no retry used (on failure, the waiter's log says why its first try failed)
    assert {t for _, t, _ in waiter.task_tries(DAG_ID, "caption")} == {1}, waited_log[-8000:]
    msrun_runs = [list(env.msrun_log_root.rglob("worker_0.log")) for env in envs]
    assert [len(runs) for runs in msrun_runs] == [1 if env in launched else 0 for env in envs]
    assert_all_captioned(read_output(client, output), rows)
    assert not list(client.list_objects_v2(Bucket=s3_bucket, Prefix="drill-twice/captions.csv.lease")
                    .get("Contents", []))  # released


def test_shell_metacharacters_arrive_literally_at_the_ranks(make_drill_env, s3_server, s3_bucket, drill_clips,
                                                             tmp_path):
    """Security: shell syntax in every templated value reaches the ranks as plain characters."""
    canary = tmp_path / "canary"
    shelly = f"$(touch {canary}) `touch {canary}`; touch {canary} && echo x | cat > {canary}.2 <'\"*?"
    named = "v $(touch pwned) `touch pwned`; & | > <'\"*?"  # for file and directory names (no slash)
    model_dir = tmp_path / f"model {named}"
    model_dir.symlink_to(TINY_QWEN2VL, target_is_directory=True)
    clips = []
    for i, (local, spec, kind) in enumerate(drill_clips[:3]):
        renamed = tmp_path / f"{i} {named}.mp4"
        renamed.symlink_to(local)
        clips.append((renamed, spec, kind))
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, f"drill-shell/{shelly}", clips)
    output = f"s3://{s3_bucket}/drill-shell/out {shelly}.csv"
    question = f"Describe the video in details {shelly}"
    conf = drill_conf(meta, output, model_dir=str(model_dir), env={"CAPTION_DRILL_NOTE": shelly})
    conf["caption_options"]["question"] = question

    env = make_drill_env()
    with _ArgvSampler() as argvs:
        proc = env.dags_test(DAG_ID, DATE, conf)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    out = read_output(client, output)  # the output landed at exactly the templated key
    assert out["path"].tolist() == [r.path for r in rows]
    assert out["caption_status"].tolist() == ["ok"] * len(rows)

    settings = [json.loads(line.split(" settings ", 1)[1])
                for lines in rank_lines(env.msrun_log_root, " settings ").values() for line in lines]
    assert len(settings) == 2  # both ranks
    for seen in settings:
        cfg = seen["config"]
        assert (cfg["meta_path"], cfg["output"], cfg["question"]) == (meta, output, question)
        assert cfg["pretrained_model_name_or_path"] == str(model_dir)
        assert seen["env"]["CAPTION_DRILL_NOTE"] == shelly
    assert not list(tmp_path.rglob("canary*"))
    for where in (tmp_path, env.home, Path.cwd()):
        assert not list(where.rglob("pwned")), where

    # Credentials: from the Airflow connection to the ranks' environment only. Never on a command line
    # (msrun's, the scheduler process's, the ranks'), in a task or rank log, or in the XCom.
    secret, key_id = env.s3_env["AWS_SECRET_ACCESS_KEY"], env.s3_env["AWS_ACCESS_KEY_ID"]
    assert any("msrun" in " ".join(a) for a in argvs) and any("caption_qwen2vl.py" in " ".join(a) for a in argvs)
    assert not [a for a in argvs if secret in " ".join(a) or key_id in " ".join(a)]
    assert secret not in proc.stdout + proc.stderr
    for log in [*env.msrun_log_root.rglob("*.log"), *env.home.glob("logs/**/*")]:
        if log.is_file():
            assert secret.encode() not in log.read_bytes(), log
    assert secret not in json.dumps(env.task_results(DAG_ID, "caption"))


class _ArgvSampler:
    """Records the command line of every process started under this one while the block runs."""

    def __enter__(self) -> list[list[str]]:
        import threading

        self.seen: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self.seen

    def _loop(self) -> None:
        import psutil

        known: set[tuple[int, tuple[str, ...]]] = set()
        while not self._stop.wait(0.2):
            for child in psutil.Process().children(recursive=True):
                try:  # a child caught between fork and exec shows its parent's argv: keep reading it
                    argv = tuple(child.cmdline())
                except psutil.Error:
                    continue
                if (child.pid, argv) not in known:
                    known.add((child.pid, argv))
                    self.seen.append(list(argv))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_bad_partition_or_model_dir_fails_up_front_without_msrun(make_drill_env, s3_server, s3_bucket, drill_clips,
                                                                  tmp_path):
    """A meta CSV without `path`, or an incomplete model dir, fails the task at once (no retry, no msrun),
    naming the problem in the task log."""
    client = s3_server.client()
    meta, _ = upload_partition(client, s3_bucket, "drill-bad", drill_clips[:1])
    client.put_object(Bucket=s3_bucket, Key="drill-bad/nopath.csv", Body=b"video,aes\na.mp4,1\n")
    incomplete = tmp_path / "incomplete-model"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((TINY_QWEN2VL / "config.json").read_text())
    env = make_drill_env(CAPTION_RETRIES="2")
    cases = [
        (drill_conf(f"s3://{s3_bucket}/drill-bad/nopath.csv", f"s3://{s3_bucket}/drill-bad/out-a.csv"), "no 'path' column"),
        (drill_conf(meta, f"s3://{s3_bucket}/drill-bad/out-b.csv", model_dir=str(incomplete)),
         "is incomplete; missing: model weights (*.safetensors), tokenizer"),
    ]
    for conf, message in cases:
        proc = env.dags_test(DAG_ID, DATE, conf)
        assert proc.returncode != 0
        assert message in proc.stdout + proc.stderr
        # failed for good in try 1 despite retries=2: retrying cannot fix the input
        assert [(t, s) for _, t, s in env.task_tries(DAG_ID, "caption")] == [(1, "failed")]
    assert not list(env.msrun_log_root.rglob("*.log"))
    assert not [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="drill-bad/").get("Contents", [])
                if o["Key"].endswith((".lease", "out-a.csv", "out-b.csv"))]
