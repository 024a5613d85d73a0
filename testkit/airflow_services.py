"""Airflow's long-running components (api-server, scheduler, dag-processor, triggerer) on 127.0.0.1, stopped
by PID.

Used by the UI test and ``demo --ui``. The metadata DB is PostgreSQL (LocalExecutor runs tasks in parallel,
which SQLite can't serve), the executor is LocalExecutor. With ``users`` (name -> role of the simple auth
manager; an empty role has no access) the simple auth manager asks for a login, with generated passwords,
and ``api()`` calls carry the first admin's token; without, everyone is admin. Only binds to loopback.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from testkit.airflow_env import AirflowEnv
from testkit.ports import free_port

log = logging.getLogger(__name__)
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


class DagWaits:
    """``wait_for_dag`` for a harness with ``api(method, path)`` and ``tail(component)``."""

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.api("GET", f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError:
                time.sleep(2)
        raise RuntimeError(f"DAG {dag_id} never appeared: {self.tail('dag-processor')}")


@dataclass
class AirflowServices(DagWaits):
    env: AirflowEnv
    pg_uri: str | None = None  # Airflow's own metadata DB; None keeps the env's SQLite (view-only use)
    components: tuple[str, ...] = COMPONENTS
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    users: dict[str, str] | None = None  # name -> simple auth manager role ("" = no role)
    passwords: dict[str, str] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configure(self) -> None:
        if self.pg_uri:
            rest = self.pg_uri.split("://", 1)[1]
            self.env.extra.update({
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{rest}",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"postgresql+asyncpg://{rest}",
            })
        self.env.extra.update({
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        })
        if self.users:
            self.passwords = {name: secrets.token_urlsafe(12) for name in self.users}
            pw_file = self.env.home / "simple_auth_manager_passwords.json"
            pw_file.write_text(json.dumps(self.passwords))
            pw_file.chmod(0o600)
            self.env.extra.update({
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in self.users.items()),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
            })

    def start(self, timeout: float = 180) -> AirflowServices:
        self.configure()
        self.env.migrate()
        airflow = str(Path(sys.executable).with_name("airflow"))
        args = {"api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                "scheduler": ["scheduler", "--skip-serve-logs"], "dag-processor": ["dag-processor"],
                "triggerer": ["triggerer", "--skip-serve-logs"]}
        for name in self.components:
            out = open(self.env.home / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            self.procs[name] = subprocess.Popen([airflow, *args[name]], env=self.env.env(), cwd=self.env.home,
                                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"airflow {name} exited: {self.tail(name)}")
            try:
                self.request("GET", "/api/v2/version", token=None)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"api-server not answering on {self.base_url}: {self.tail('api-server')}")

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.env.home / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def token(self, user: str) -> str:
        """A JWT for ``user`` from the simple auth manager's login endpoint (the UI's session token)."""
        if user not in self._tokens:
            body = {"username": user, "password": self.passwords[user]}
            self._tokens[user] = self.request("POST", "/auth/token", body, token=None)[1]["access_token"]
        return self._tokens[user]

    def _admin(self) -> str | None:
        if not self.users:
            return None
        return self.token(next(u for u, r in self.users.items() if r.lower() == "admin"))

    def request(self, method: str, path: str, body: dict | None = None, *, token: str | None = None,
                cookie: str | None = None, timeout: float = 30) -> tuple[int, object, dict[str, str]]:
        """(status, body, headers) of one call, errors included; ``token`` as Bearer, ``cookie`` as the UI's."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if cookie:
            headers["Cookie"] = f"_token={cookie}"
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw, hdrs = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as err:
            status, raw, hdrs = err.code, err.read(), err.headers
        value = json.loads(raw) if raw and hdrs.get_content_type() == "application/json" else raw
        return status, value, {k.lower(): v for k, v in hdrs.items()}

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        status, value, _ = self.request(method, path, body, token=self._admin(), timeout=timeout)
        if status >= 400:
            raise urllib.error.HTTPError(f"{self.base_url}{path}", status, str(value)[:500], None, None)
        return value

    def trigger(self, dag_id: str, logical_date: str, conf: dict) -> str:
        self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": logical_date, "conf": conf})
        return run["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900) -> str:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(3)
        raise RuntimeError(f"run {run_id} still {state}: {self.tail('scheduler')}")

    def stop(self) -> None:
        """SIGTERM each component's process group, then SIGKILL what is left."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            with _suppress():
                proc.wait(timeout=5)
        self.procs.clear()

    def __enter__(self) -> AirflowServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, ProcessLookupError | PermissionError | OSError)
