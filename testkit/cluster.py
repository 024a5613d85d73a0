"""The production shape on one machine: Airflow with CeleryExecutor on PostgreSQL and Redis, two "NPU hosts".

Components, each a separate process group on 127.0.0.1, started health-checked and stopped by PID:
api-server, scheduler, dag-processor, triggerer, one Celery worker on the ``default`` queue and one Celery worker
per ascend host on the ``ascend`` queue (``airflow celery worker -q ascend -c <NPU slots>``). Each host has its
own hostname (``[core] hostname_callable`` reads ``CLUSTER_HOSTNAME``), its own msrun log root and temp dir
(where ranks cache videos), as separate machines would. Task logs go to S3 (remote logging), so the API server
reads every finished try from there, not from the host that ran it. Airflow's log folder is shared by all
components, as docker-compose.yaml's ``airflow-logs`` volume is: Airflow uploads a try's log to S3 only when
the try ends, so the log of a try whose host died is readable only from a shared folder (or a streaming log
backend), never from S3.

The scheduler's task heartbeat timeout is short (``heartbeat_timeout``) so that a host that vanishes is noticed
in seconds, not the default five minutes; the caption lease TTL is short for the same reason.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from testkit.airflow_env import REPO, AirflowEnv
from testkit.airflow_services import DagWaits
from testkit.ports import free_port
from testkit.process import stop_process_group, tail

log = logging.getLogger(__name__)

CAPTION_POOL = "ascend_npus"

# How the fixture's settings relate to docker-compose.yaml (tests/test_compose.py fails on any drift).
# Same name and same value in the compose file's common environment:
COMPOSE_SAME_VALUE = ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__LOGGING__REMOTE_LOGGING", "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID",
                      "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER", "CAPTION_QUEUE", "CAPTION_POOL",
                      "CAPTION_S3_CONN_ID", "CAPTION_DB_CONN_ID")
# Same name; the value is an address, a secret generated per run, or a drill setting (short timeouts):
COMPOSE_SAME_NAME = ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC",
                     "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND", "AIRFLOW__CORE__FERNET_KEY",
                     "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__API_AUTH__JWT_SECRET",
                     "AIRFLOW__API__SECRET_KEY", "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER", "AIRFLOW__CORE__PARALLELISM",
                     "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT", "CAPTION_LEASE_TTL_SECONDS",
                     "AIRFLOW__CORE__LOAD_EXAMPLES", "AIRFLOW_CONN_CAPTION_S3", "AIRFLOW_CONN_CURATION_DB",
                     "CAPTION_MODEL_DIR", "CAPTION_MSRUN_LOG_ROOT")
# Only in the fixture: how one machine stands in for several, and what makes a test quick and local.
FIXTURE_ONLY = ("AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__PLUGINS_FOLDER", "AIRFLOW__API__HOST", "AIRFLOW__API__PORT",
                "AIRFLOW__API__BASE_URL", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS",
                "AIRFLOW__LOGGING__LOGGING_LEVEL", "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "AIRFLOW__CORE__HOSTNAME_CALLABLE",
                "CLUSTER_HOSTNAME", "CAPTION_RETRY_DELAY_SECONDS",
                "CURATION_RETRY_DELAY_SECONDS", "TMPDIR", "PYTHONPATH", "PYTHONUNBUFFERED", "PATH")
# The compose service that runs each fixture component, and the worker service per queue.
COMPOSE_SERVICES = {"api-server": "airflow-apiserver", "scheduler": "airflow-scheduler",
                    "dag-processor": "airflow-dag-processor", "triggerer": "airflow-triggerer"}
COMPOSE_WORKERS = {"default": "airflow-worker", "ascend": "airflow-worker-ascend"}


def hostname() -> str:
    """``[core] hostname_callable`` for the cluster: one machine standing in for several hosts."""
    return os.environ.get("CLUSTER_HOSTNAME") or socket.getfqdn()


@dataclass(frozen=True)
class Host:
    """A worker machine: its name, the Celery queues it serves, and how many tasks it runs at once."""

    name: str
    queues: str
    concurrency: int


def default_hosts(ascend_hosts: int = 2, npu_slots_per_host: int = 1) -> list[Host]:
    return [Host("cpu-0", "default", 2),
            *[Host(f"ascend-{i}", "ascend", npu_slots_per_host) for i in range(ascend_hosts)]]


def pool_size(hosts: list[Host]) -> int:
    """Slots of ``ascend_npus``: hosts x NPUs per host / NPUs per task = the ascend workers' total concurrency."""
    return sum(h.concurrency for h in hosts if "ascend" in h.queues.split(","))


@dataclass
class AirflowCluster(DagWaits):
    env: AirflowEnv
    pg_uri: str  # Airflow's own metadata DB (postgresql://...)
    broker_url: str  # redis://:password@127.0.0.1:port/0
    log_bucket: str  # remote task logs go to s3://<log_bucket>/airflow-logs
    hosts: list[Host] = field(default_factory=default_hosts)
    heartbeat_timeout: int = 20
    lease_ttl: int = 15
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def host_dir(self, host: str) -> Path:
        return self.env.home / "hosts" / host

    def msrun_log_root(self, host: str) -> Path:
        return self.host_dir(host) / "msrun"

    def configure(self) -> None:
        from cryptography.fernet import Fernet

        rest = self.pg_uri.split("://", 1)[1]
        self.env.extra.update({
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{rest}",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"postgresql+asyncpg://{rest}",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql://{rest}",
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "testkit.cluster.hostname",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(self.heartbeat_timeout),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
            "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": f"s3://{self.log_bucket}/airflow-logs",
            "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": "caption_s3",
            "CAPTION_QUEUE": "ascend",
            "CAPTION_S3_CONN_ID": "caption_s3",
            "CAPTION_DB_CONN_ID": "curation_db",
            "CAPTION_POOL": CAPTION_POOL,
            "CAPTION_LEASE_TTL_SECONDS": str(self.lease_ttl),
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")]),
        })

    def host_env(self, host: Host) -> dict[str, str]:
        """What differs between machines: hostname, local disks (task logs, msrun logs, video cache)."""
        base = self.host_dir(host.name)
        for sub in ("msrun", "tmp"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        return {"CLUSTER_HOSTNAME": host.name, "CAPTION_MSRUN_LOG_ROOT": str(base / "msrun"),
                "TMPDIR": str(base / "tmp")}

    def _spawn(self, name: str, args: list[str], extra: dict[str, str] | None = None) -> None:
        airflow = str(Path(sys.executable).with_name("airflow"))
        out = open(self.env.home / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen([airflow, *args], env={**self.env.env(), **(extra or {})},
                                            cwd=self.env.home, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def start(self, timeout: float = 240) -> AirflowCluster:
        started = time.monotonic()
        self.configure()
        self.env.migrate()
        slots = pool_size(self.hosts)
        self.env.airflow("pools", "set", CAPTION_POOL, str(slots),
                         "NPU slots: ascend hosts x NPUs per host / NPUs per caption task")
        flags = {"api-server": ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                 "scheduler": ["--skip-serve-logs"], "triggerer": ["--skip-serve-logs"]}
        for component in COMPOSE_SERVICES:  # the same components as docker-compose.yaml
            self._spawn(component, [component, *flags.get(component, [])])
        for host in self.hosts:
            self.start_worker(host)
        deadline = time.monotonic() + timeout
        self._wait(lambda: self._api_up(), deadline, "api-server answering /api/v2/version")
        for host in self.hosts:
            self._wait(lambda h=host: " ready." in tail(self.env.home / f"worker-{h.name}.log", 400), deadline,
                       f"celery worker {host.name} ready")
        log.info("cluster up in %.1fs: %s", time.monotonic() - started, ", ".join(self.procs))
        return self

    def start_worker(self, host: Host) -> None:
        self._spawn(f"worker-{host.name}",
                    ["celery", "worker", "-q", host.queues, "-c", str(host.concurrency), "-H", f"{host.name}@%h",
                     "--skip-serve-logs", "--without-mingle", "--without-gossip"], self.host_env(host))

    def _wait(self, ready, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"airflow {name} exited ({proc.returncode}) before {what}:\n{self.tail(name)}")
            if ready():
                return
            time.sleep(1)
        raise RuntimeError(f"timed out waiting for {what}")

    def _api_up(self) -> bool:
        try:
            self.api("GET", "/api/v2/version")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def tail(self, name: str, lines: int = 60) -> str:
        return tail(self.env.home / f"{name}.log", lines)

    # -- API ------------------------------------------------------------------------------------------------
    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw and resp.headers.get_content_type() == "application/json" else raw

    def trigger(self, dag_id: str, partition_key: str, conf: dict) -> str:
        """A manual run for one partition key (what the trigger form does)."""
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                       {"logical_date": None, "partition_key": partition_key, "conf": conf})
        return run["dag_run_id"]

    def runs(self, dag_id: str, keys: set[str] | None = None) -> list[dict]:
        """The DAG's runs (of these partition keys only, if given), oldest first."""
        runs = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100&order_by=run_after")["dag_runs"]
        return [r for r in runs if keys is None or r.get("partition_key") in keys]

    def wait_for_runs(self, dag_id: str, keys: set[str], timeout: float = 1200) -> list[dict]:
        """Block until every key has a run and none of them is queued or running; returns them."""
        deadline = time.monotonic() + timeout
        runs: list[dict] = []
        while time.monotonic() < deadline:
            runs = self.runs(dag_id, keys)
            if {r["partition_key"] for r in runs} == keys and all(r["state"] in ("success", "failed") for r in runs):
                return runs
            time.sleep(3)
        raise RuntimeError(f"runs of {dag_id} not done: {[(r['dag_run_id'], r['state']) for r in runs]}\n"
                           f"{self.tail('scheduler')}")

    def backfill(self, dag_id: str, from_date: str, to_date: str, *args: str, timeout: float = 1500) -> dict:
        """``airflow backfill create`` and wait until the scheduler marks that backfill completed.

        Returns its id and (partition_key, state, skip reason, run_id) per partition. For a partitioned DAG,
        ``--reprocess-behavior completed`` makes NEW runs for keys that already have one (3.3.2), where a
        date-keyed DAG would clear and relabel the existing run."""
        before = self.query("SELECT coalesce(max(id), 0) FROM backfill")[0][0]
        self.env.airflow("backfill", "create", "--dag-id", dag_id, "--from-date", from_date, "--to-date", to_date,
                         *args)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.query("SELECT id, completed_at FROM backfill WHERE id > %s ORDER BY id", (before,))
            if rows and rows[-1][1] is not None:
                runs = self.query("SELECT bdr.partition_key, dr.state, bdr.exception_reason, dr.run_id "
                                  "FROM backfill_dag_run bdr LEFT JOIN dag_run dr ON dr.id = bdr.dag_run_id "
                                  "WHERE bdr.backfill_id = %s ORDER BY bdr.sort_ordinal", (rows[-1][0],))
                return {"id": rows[-1][0], "runs": runs}
            time.sleep(3)
        raise RuntimeError(f"backfill of {dag_id} not completed after {timeout}s: {self.tail('scheduler')}")

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """A try's log as the UI gets it from the API server (its text, whatever handler it came from)."""
        quoted = urllib.parse.quote(run_id, safe="")
        body = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/taskInstances/{task_id}/logs/"
                               f"{try_number}?map_index={map_index}&full_content=true")
        content = body.get("content", []) if isinstance(body, dict) else []
        return "\n".join(c.get("event", "") if isinstance(c, dict) else str(c) for c in content)

    # -- metadata DB ----------------------------------------------------------------------------------------
    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(self.pg_uri)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def task_tries(self, dag_id: str, task_id: str) -> list[dict]:
        """Every try of a task (history and current), with its run's partition key, host and times."""
        cols = "ti.run_id, dr.partition_key, ti.map_index, ti.try_number, ti.state, ti.hostname, " \
               "ti.start_date, ti.end_date, ti.queued_dttm"
        rows = []
        for table in ("task_instance_history", "task_instance"):
            rows += self.query(f"SELECT {cols} FROM {table} ti JOIN dag_run dr ON dr.dag_id = ti.dag_id AND "  # noqa: S608
                               "dr.run_id = ti.run_id WHERE ti.dag_id = %s AND ti.task_id = %s",
                               (dag_id, task_id))
        keys = ("run_id", "partition_key", "map_index", "try_number", "state", "hostname", "start_date",
                "end_date", "queued_dttm")
        seen = {}
        for row in rows:
            d = dict(zip(keys, row, strict=True))
            seen.setdefault((d["run_id"], d["map_index"], d["try_number"]), d)
        return sorted(seen.values(), key=lambda d: (d["start_date"] is None, d["start_date"] or 0))

    def xcom(self, dag_id: str, task_id: str, key: str = "return_value") -> list[tuple[str, int, object]]:
        rows = self.query("SELECT run_id, map_index, value FROM xcom WHERE dag_id = %s AND task_id = %s "
                          "AND key = %s ORDER BY run_id, map_index", (dag_id, task_id, key))
        out = []
        for run_id, map_index, value in rows:
            while isinstance(value, str | bytes | memoryview):
                try:
                    value = json.loads(bytes(value) if isinstance(value, memoryview) else value)
                except ValueError:
                    break
            out.append((run_id, map_index, value))
        return out

    # -- host loss ------------------------------------------------------------------------------------------
    def kill_host(self, host: str) -> tuple[float, list[int]]:
        """SIGKILL a worker's whole process tree (Celery worker, pool children, task supervisor and runner,
        msrun, ranks), frozen first with SIGSTOP so nothing forks or reaps in between. Returns the wall
        time of the kill and the PIDs killed."""
        proc = self.procs[f"worker-{host}"]
        tree = descendants(proc.pid)
        pids = [proc.pid, *tree]
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        pids = [proc.pid, *descendants(proc.pid)]  # anything forked before the stop landed
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        killed_at = time.time()
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.warning("host %s lost: SIGKILLed %d processes", host, len(pids))
        return killed_at, pids

    # -- stop -----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Workers first (warm shutdown: SIGTERM to the worker, which ends its tasks), then the services."""
        order = sorted(self.procs, key=lambda n: (not n.startswith("worker-"), n))
        for name in order:
            proc = self.procs[name]
            below = {pid: _start_time(pid) for pid in descendants(proc.pid)} if proc.poll() is None else {}
            try:
                stop_process_group(proc, name, steps=((signal.SIGTERM, 20.0),))
            except Exception as err:  # keep stopping the others
                log.warning("stopping %s: %s", name, err)
            for pid, started in below.items():  # task processes live in their own groups
                if started is not None and _start_time(pid) == started:
                    log.warning("%s left pid %d behind; sending SIGKILL", name, pid)
                    _signal(pid, signal.SIGKILL)
        self.procs.clear()

    def __enter__(self) -> AirflowCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ... whatever session or group they are in)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parent_of[int(entry.name)] = ppid
    found, frontier = [], [pid]
    while frontier:
        nxt = [child for child, parent in parent_of.items() if parent in frontier]
        found += nxt
        frontier = nxt
    return found


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
