"""A throwaway Airflow home (SQLite, 127.0.0.1 only) wired to this repo's DAGs, plugins and tiny model.

Used by the end-to-end tests and the demo. Airflow is always run as a separate process (``airflow ...``)
so that its configuration never leaks into the caller.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from testkit.paths import REPO, TINY_QWEN2VL
from testkit.profile import TINY

_MIGRATED_SQLITE: dict[str, Path] = {}  # "db": a freshly migrated SQLite metadata DB, copied into new homes
# Caption options that fit the tiny model on a CPU: small pixel budget, few frames, short captions.
TINY_CAPTION_OPTIONS = {"device_target": "CPU", **TINY.caption_options(max_new_tokens=12, bs=2, log_every=5)}


@dataclass
class AirflowEnv:
    home: Path
    s3_env: dict[str, str]
    db_uri: str
    extra: dict[str, str] = field(default_factory=dict)
    dags_folder: Path = REPO / "dags"

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    @property
    def msrun_log_root(self) -> Path:
        return self.home / "msrun"

    def env(self) -> dict[str, str]:
        s3_conn = {"conn_type": "aws", "login": self.s3_env["AWS_ACCESS_KEY_ID"],
                   "password": self.s3_env["AWS_SECRET_ACCESS_KEY"],
                   "extra": {"endpoint_url": self.s3_env["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_"))}
        env.update({
            "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_CAPTION_S3": json.dumps(s3_conn),
            "AIRFLOW_CONN_CURATION_DB": self.db_uri,
            "CAPTION_MODEL_DIR": str(TINY_QWEN2VL),
            "CAPTION_QUEUE": "default",
            "CAPTION_POOL": "default_pool",  # the cluster fixture (testkit.cluster) creates ascend_npus
            "CAPTION_RETRY_DELAY_SECONDS": "5",
            "CURATION_RETRY_DELAY_SECONDS": "5",
            "CAPTION_MSRUN_LOG_ROOT": str(self.msrun_log_root),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra)
        return env

    def airflow(self, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(Path(sys.executable).with_name("airflow")), *args], env=self.env(),
                              cwd=self.home, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                               f"{proc.stderr[-4000:]}")
        return proc

    def migrate(self) -> None:
        """``airflow db migrate``. A SQLite home copies the DB the first home of this process migrated (the
        schema, pools and log templates, no home-specific path): about 4 s saved per home."""
        db = self.home / "airflow.db"
        sqlite = self.env()["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{db}"
        template = _MIGRATED_SQLITE.get("db")
        if sqlite and template is not None and not db.exists():
            shutil.copyfile(template, db)
            return
        self.airflow("db", "migrate", timeout=600)
        if sqlite and template is None:
            copy = Path(tempfile.mkdtemp(prefix="airflow-db-")) / "airflow.db"
            shutil.copyfile(db, copy)
            atexit.register(shutil.rmtree, copy.parent, True)
            _MIGRATED_SQLITE["db"] = copy

    def dags_test(self, dag_id: str, logical_date: str, conf: dict) -> subprocess.CompletedProcess:
        return self.airflow("dags", "test", dag_id, logical_date, "-c", json.dumps(conf), check=False)

    def _query(self, *statements: str, params: tuple = ()) -> list[tuple]:
        """Rows of read-only statements against this home's SQLite metadata DB."""
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.home / "airflow.db")) as db:
            return [row for sql in statements for row in db.execute(sql, params)]

    def task_results(self, dag_id: str, task_id: str) -> list[tuple[str, int, object]]:
        """(run_id, map_index, return value) of every finished try of a task, read from the metadata DB."""
        rows = self._query("SELECT run_id, map_index, value FROM xcom WHERE dag_id = ? AND task_id = ? "
                           "AND key = 'return_value' ORDER BY run_id, map_index", params=(dag_id, task_id))
        return [(run_id, map_index, _json_value(value)) for run_id, map_index, value in rows]

    def task_tries(self, dag_id: str, task_id: str) -> list[tuple[str, int, str]]:
        """(run_id, try_number, state) of every try of a task, from the task-instance history and table."""
        query = "SELECT run_id, try_number, state FROM {} WHERE dag_id = ? AND task_id = ?"
        return sorted(self._query(query.format("task_instance_history"), query.format("task_instance"),
                                  params=(dag_id, task_id)))


def _json_value(value):
    while isinstance(value, str | bytes):  # stored as JSON text (possibly encoded twice)
        try:
            value = json.loads(value)
        except ValueError:
            break
    return value
