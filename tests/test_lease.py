"""The partition lease fences attempts (real SeaweedFS; the Airflow drill runs real msrun under the task runner).

- racing contenders: exactly one wins, whatever the interleaving;
- a holder whose process is gone is taken over at once by a contender on the same host (not after the TTL),
  and the dead holder's msrun, if it somehow survived, is killed first;
- a stolen lease is noticed within one renewal period, and release never deletes someone else's lease;
- the publish fence: a rank whose attempt no longer holds the lease never writes the output;
- through Airflow: a task SIGKILLed with its msrun is taken over within seconds by the next attempt on this
  host; that attempt, its lease stolen, stops msrun within one renewal period, publishes nothing and fails;
  the one after completes the partition with nothing lost or duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from operators.lease import LeaseHeldError, S3Lease, process_start
from testkit.airflow_env import REPO, TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.process import alive, caption_processes, wait_for

pytestmark = [pytest.mark.integration]

HOLDER = """
import json, subprocess, sys, time
sys.path.insert(0, {plugins!r})
import boto3
from operators.lease import S3Lease
client = boto3.client("s3", endpoint_url={endpoint!r}, aws_access_key_id={key!r}, aws_secret_access_key={secret!r},
                      region_name="us-east-1")
lease = S3Lease(client, {bucket!r}, "p/out.csv.lease", holder="dead-task", ttl=600)
lease.acquire(wait=5)
child = subprocess.Popen(["sleep", "600"], start_new_session=True)  # stands for an msrun that outlived us
lease.record_child(child.pid)
print(child.pid, flush=True)
time.sleep(600)
"""


def _client(s3_server):
    return s3_server.client()


def test_racing_contenders_exactly_one_wins(s3_server, s3_bucket):
    client = _client(s3_server)
    for round_ in range(3):
        leases = [S3Lease(client, s3_bucket, f"race{round_}.lease", holder=f"c{i}") for i in range(8)]
        barrier = threading.Barrier(len(leases))

        def contend(lease: S3Lease, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return lease.try_acquire()

        with ThreadPoolExecutor(len(leases)) as pool:
            won = list(pool.map(contend, leases))
        assert won.count(True) == 1, won


def test_a_dead_holder_on_this_host_is_taken_over_at_once_and_its_orphan_killed(s3_server, s3_bucket):
    env = s3_server.env()
    code = HOLDER.format(plugins=str(REPO / "plugins"), endpoint=env["AWS_ENDPOINT_URL"],
                         key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], bucket=s3_bucket)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    orphan_pid = int(holder.stdout.readline())
    orphan = psutil.Process(orphan_pid)
    try:
        contender = S3Lease(_client(s3_server), s3_bucket, "p/out.csv.lease", holder="retry", ttl=600, poll=0.5)
        assert not contender.try_acquire()  # the holder lives: its 600 s lease holds
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        contender.acquire(wait=30)
        took = time.monotonic() - started
        assert took < 5, took  # not the 600 s TTL
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        body = json.loads(_client(s3_server).get_object(Bucket=s3_bucket, Key="p/out.csv.lease")["Body"].read())
        assert (body["holder"], body["pid"]) == ("retry", os.getpid())
        assert abs(body["pid_start"] - process_start(os.getpid())) < 0.5 and body["boot_id"]
        contender.release()
    finally:
        for pid in (holder.pid, orphan_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_live_holder_elsewhere_is_not_taken_over(s3_server, s3_bucket):
    client = _client(s3_server)
    body = {"token": "other-host", "host": "another-host", "boot_id": "x", "pid": 1, "pid_start": 0,
            "expires_at": time.time() + 600}
    client.put_object(Bucket=s3_bucket, Key="o.lease", Body=json.dumps(body).encode())
    with pytest.raises(LeaseHeldError, match="held by other-host"):
        S3Lease(client, s3_bucket, "o.lease", holder="me", poll=0.2).acquire(wait=1)


def test_a_stolen_lease_is_lost_within_one_renewal_and_release_leaves_it(s3_server, s3_bucket):
    client = _client(s3_server)
    lost = []
    lease = S3Lease(client, s3_bucket, "s.lease", holder="victim", ttl=8,
                    on_lost=lambda why: lost.append((time.monotonic(), why)))
    lease.acquire(wait=5)
    assert lease.renew_every == 2
    time.sleep(1)
    thief = {"token": "thief", "expires_at": time.time() + 600}
    client.put_object(Bucket=s3_bucket, Key="s.lease", Body=json.dumps(thief).encode())
    stolen_at = time.monotonic()
    deadline = stolen_at + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and lost[0][0] - stolen_at <= lease.renew_every + 0.5, lost
    assert "another attempt took the lease over" in lost[0][1]
    lease.release()  # conditional on our ETag: the thief's lease stays
    assert json.loads(client.get_object(Bucket=s3_bucket, Key="s.lease")["Body"].read())["token"] == "thief"


def test_the_publish_fence_holds_only_while_the_lease_is_ours_with_time_left(s3_server, s3_bucket, s3_env):
    from captioning_core.lease_fence import LeaseFence, LeaseLostError

    client = _client(s3_server)
    lease = S3Lease(client, s3_bucket, "f/out.csv.lease", holder="me", ttl=8)
    fence = lease.fence()
    with pytest.raises(LeaseLostError, match="not provably ours: cannot read it"):
        LeaseFence(fence.uri, fence.token, fence.ttl, wait=0).check()  # not acquired yet: no such object
    lease.acquire(wait=5)
    assert LeaseFence.from_env() is None  # no CAPTION_LEASE: the CLI on its own is not fenced
    s3_env.setenv(*next(iter(fence.env().items())))
    assert LeaseFence.from_env() == fence
    fence.check()  # ours, renewed every 2 s: at least 6 s of the 8 s ttl left

    # renewals failing (S3 trouble at the holder): near expiry the fence waits, and passes once one lands
    lease._stop.set()
    near = {"token": lease.token, "expires_at": time.time() + 1}
    client.put_object(Bucket=s3_bucket, Key="f/out.csv.lease", Body=json.dumps(near).encode())
    with pytest.raises(LeaseLostError, match=r"not provably ours: it expires in"):
        LeaseFence(fence.uri, fence.token, fence.ttl, wait=1.5, poll=0.5).check()
    renewal = threading.Timer(1.0, lambda: client.put_object(
        Bucket=s3_bucket, Key="f/out.csv.lease",
        Body=json.dumps({**near, "expires_at": time.time() + 8}).encode()))
    renewal.start()
    started = time.monotonic()
    LeaseFence(fence.uri, fence.token, fence.ttl, wait=10, poll=0.25).check()
    assert 0.9 <= time.monotonic() - started < 5
    renewal.join()

    # taken over: refused at once, whatever time the new holder's lease has left
    client.put_object(Bucket=s3_bucket, Key="f/out.csv.lease",
                      Body=json.dumps({"token": "next", "expires_at": time.time() + 600}).encode())
    started = time.monotonic()
    with pytest.raises(LeaseLostError, match="held by next; not publishing"):
        fence.check()
    assert time.monotonic() - started < 2


# -- through Airflow, real msrun ------------------------------------------------------------------------
DAGS = Path(__file__).resolve().parent / "airflow_dags"
DATE = "2026-11-24"


class _Attempt:
    """One `airflow dags test` in the background, its output drained (a full pipe would stall it)."""

    def __init__(self, env: AirflowEnv, cmd: list[str]) -> None:
        self.env = env
        self.proc = subprocess.Popen(cmd, env=env.env(), cwd=env.home, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def finish(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.msrun
@pytest.mark.e2e
def test_takeover_after_sigkill_then_a_stolen_lease_stops_msrun(s3_server, s3_bucket, tmp_path_factory, tmp_path):
    import io

    import pandas as pd

    from testkit.clips import ensure_clip
    from testkit.demo_clips import PARTITION_SPECS
    from testkit.partition import upload_partition

    directory = tmp_path_factory.mktemp("lease-clips")
    clips = [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS[:6]]
    client = _client(s3_server)
    meta, rows = upload_partition(client, s3_bucket, "lease", clips)
    output = meta.replace("meta.csv", "captions.csv")
    lease_key = "lease/captions.csv.lease"
    conf = {"meta_path": meta, "output_uri": output, "caption_options": {**TINY_CAPTION_OPTIONS, "bs": 1}}

    def start(name: str, **extra: str) -> tuple[AirflowEnv, _Attempt]:
        env = AirflowEnv(tmp_path / name, s3_server.env(), "postgresql://unused", dags_folder=DAGS,
                         extra={"CAPTION_RETRIES": "0", "CAPTION_FAULTS": "slow@0:2,slow@1:2", **extra})
        env.migrate()
        cmd = [str(Path(sys.executable).with_name("airflow")), "dags", "test", "caption_drill", DATE, "-c",
               json.dumps(conf)]
        return env, _Attempt(env, cmd)

    def parts() -> int:
        return len(client.list_objects_v2(Bucket=s3_bucket, Prefix="lease/captions.csv.parts/").get("Contents", []))

    # 1. attempt A holds the lease and runs msrun; it is SIGKILLed (OOM killer, node trouble): no cleanup runs
    env_a, a = start("airflow-a")
    try:
        wait_for(lambda: parts() >= 1, 400, "attempt A's first journal part")
        tree_a = caption_processes(a.pid)
        assert tree_a
        os.kill(a.pid, signal.SIGKILL)
        a.finish(timeout=10)
        wait_for(lambda: not alive(tree_a), 20, "attempt A's msrun tree to die with it")
    finally:
        a.kill()
    assert json.loads(client.get_object(Bucket=s3_bucket, Key=lease_key)["Body"].read())["pid"] == a.pid

    # 2. attempt B on this host takes the 60 s lease over at once; its own lease renews every 2 s (ttl 8)
    env_b, b = start("airflow-b", CAPTION_LEASE_TTL="8")
    try:
        body = wait_for(lambda: _lease_holder(client, s3_bucket, lease_key, b.pid), 120, "B to take the lease")
        before = parts()
        wait_for(lambda: caption_processes(b.pid) and parts() > before, 400, "attempt B captioning")
        tree_b = caption_processes(b.pid)
        # 3. the lease is stolen (another deployment's attempt, a clock gone wrong): B must stop
        thief = {"token": "thief", "expires_at": time.time() + 10}  # expired by the time C asks: C takes it over
        client.put_object(Bucket=s3_bucket, Key=lease_key, Body=json.dumps(thief).encode())
        stolen_at = time.monotonic()
        wait_for(lambda: not alive(tree_b), 30, "attempt B's msrun to stop")
        stopped_after = time.monotonic() - stolen_at
        out_b = b.finish(timeout=300)
    finally:
        b.kill()
    print(f"lease: B took over A's lease (holder {body['pid']}); stolen lease -> msrun gone in {stopped_after:.1f}s")
    assert "taking over lease" in out_b and "is gone" in out_b
    assert "lost the partition lease" in out_b and "msrun was stopped" in out_b
    assert stopped_after <= 2 + 4 + 3  # one renewal period + kill_grace + polling slack
    assert [(t, s) for _, t, s in env_b.task_tries("caption_drill", "caption")] == [(1, "failed")]
    assert json.loads(client.get_object(Bucket=s3_bucket, Key=lease_key)["Body"].read())["token"] == "thief"
    # B's ranks publish nothing, even one that finished its rows before msrun was stopped (the publish fence)
    assert "lease/captions.csv" not in [o["Key"] for o in client.list_objects_v2(
        Bucket=s3_bucket, Prefix="lease/captions.csv").get("Contents", [])]

    # 4. once the thief's lease expires, attempt C completes the partition: nothing lost or duplicated
    env_c, c = start("airflow-c")
    try:
        out_c = c.finish(timeout=900)
    finally:
        c.kill()
    assert c.proc.returncode == 0, out_c[-5000:]
    assert "taking over expired lease" in out_c  # C waited out the thief's lease, then captioned
    assert '"CAPTION_LEASE": "{' in out_c  # its ranks were told the lease to check before they published
    out = pd.read_csv(io.BytesIO(client.get_object(Bucket=s3_bucket, Key="lease/captions.csv")["Body"].read()),
                      dtype=str, keep_default_na=False)
    assert out["path"].tolist() == [r.path for r in rows]
    assert out["text"].tolist() == [r.expected_caption for r in rows]
    [(_, _, result)] = env_c.task_results("caption_drill", "caption")
    assert result["skipped"] > 0 and result["captioned"] == len(rows)  # A's and B's journaled rows were reused
    assert not client.list_objects_v2(Bucket=s3_bucket, Prefix=lease_key).get("Contents")  # released


def _lease_holder(client, bucket: str, key: str, pid: int) -> dict | None:
    try:
        body = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception:
        return None
    return body if body.get("pid") == pid else None


@pytest.mark.e2e
def test_a_held_lease_reschedules_the_task_and_fails_it_after_lease_wait(s3_server, s3_bucket, tmp_path):
    """Issue 25 #13: another attempt's live lease. The task does not wait in its slot: each look that finds the
    lease held reschedules it (UP_FOR_RESCHEDULE, no retry used), and once ``lease_wait`` has passed since its
    first look it fails, naming the holder. msrun never starts and the other attempt's lease is untouched."""
    client = _client(s3_server)
    meta = f"s3://{s3_bucket}/wait/meta.csv"
    client.put_object(Bucket=s3_bucket, Key="wait/meta.csv", Body=b"path\ns3://x/y.mp4\n")
    other = {"token": "another-host-attempt", "host": "another-host", "boot_id": "x", "pid": 1, "pid_start": 0,
             "expires_at": time.time() + 600}
    client.put_object(Bucket=s3_bucket, Key="wait/out.csv.lease", Body=json.dumps(other).encode())
    env = AirflowEnv(tmp_path / "airflow", s3_server.env(), "postgresql://unused", dags_folder=DAGS,
                     extra={"CAPTION_RETRIES": "0", "CAPTION_LEASE_WAIT": "8", "CAPTION_LEASE_POKE": "2"})
    env.migrate()
    conf = {"meta_path": meta, "output_uri": f"s3://{s3_bucket}/wait/out.csv", "caption_options": TINY_CAPTION_OPTIONS}
    proc = env.dags_test("caption_drill", DATE, conf)
    out = proc.stdout + proc.stderr
    looks = out.count("is held by another-host-attempt; rescheduled to look again in 2s, its pool slot released")
    assert looks >= 2, out[-3000:]
    assert "LeaseHeldError" in out and "of lease_wait 8s" in out, out[-3000:]
    assert {(t, s) for _, t, s in env.task_tries("caption_drill", "caption")} == {(1, "failed")}  # no retry used
    assert not list(env.msrun_log_root.rglob("*"))  # msrun never started
    body = json.loads(client.get_object(Bucket=s3_bucket, Key="wait/out.csv.lease")["Body"].read())
    assert body["token"] == "another-host-attempt"  # the other attempt's lease is untouched
