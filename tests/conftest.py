"""Shared fixtures: real SeaweedFS S3 and PostgreSQL servers, and synthetic video clips."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Airflow, when a test imports it in this process, must not touch ~/airflow: give it a private home first.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="pytest-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from testkit.airflow_env import AirflowEnv
from testkit.clips import ClipSpec, broken_set, ensure_clip, standard_set
from testkit.demo_clips import PARTITION_SPECS
from testkit.drill_dag import DAGS
from testkit.partition import mixed_partition
from testkit.paths import REPO, TINY_QWEN2VL
from testkit.pgserver import PostgresServer
from testkit.ports import free_port
from testkit.s3server import SeaweedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A started ``weed mini`` for the whole session; stopped by PID at the end."""
    try:
        server = SeaweedS3(data_dir=tmp_path_factory.mktemp("seaweed"))
    except Exception as err:
        pytest.fail(f"SeaweedFS S3 server cannot be set up: {err}", pytrace=False)
    try:
        server.start()
    except Exception as err:
        server.close()
        pytest.fail(f"SeaweedFS S3 server could not start: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    """A fresh, uniquely named, empty bucket."""
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """This process's ``captioning_core.storage`` pointed at the test S3 server (a fresh client each way)."""
    from captioning_core import storage

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    storage.s3_client.cache_clear()
    yield monkeypatch
    storage.s3_client.cache_clear()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A started PostgreSQL for the whole session; stopped by PID and deleted at the end."""
    try:
        server = PostgresServer()
    except Exception as err:
        pytest.fail(f"PostgreSQL server cannot be set up: {err}", pytrace=False)
    try:
        server.start()
    except Exception as err:
        server.close()
        pytest.fail(f"PostgreSQL server could not start: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_database(pg_server: PostgresServer) -> str:
    """DSN of a fresh database."""
    return pg_server.create_database(f"test_{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the standard clip set, rendered once ($TESTKIT_CLIP_CACHE keeps it across runs)."""
    cache = os.environ.get("TESTKIT_CLIP_CACHE")
    directory = Path(cache) if cache else tmp_path_factory.mktemp("clips")
    standard_set(directory)
    return directory


@pytest.fixture(scope="session")
def standard_clips(clip_dir: Path) -> list[tuple[Path, ClipSpec]]:
    """(path, spec) of every clip in the standard set."""
    return standard_set(clip_dir)


@pytest.fixture(scope="session")
def broken_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kind -> path of every deliberately broken file (and the valid one-frame clip)."""
    return broken_set(tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def partition_clips(tmp_path_factory: pytest.TempPathFactory, broken_clips: dict[str, Path]
                    ) -> list[tuple[Path, ClipSpec | None, str]]:
    """The mixed partition the msrun tests caption: every demo partition clip, broken files interleaved."""
    return mixed_partition(tmp_path_factory.mktemp("partition-clips"), broken_clips)


# -- Airflow drills (testkit/drill_dag.py) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def drill_clips(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, ClipSpec, str]]:
    """The first six demo partition clips, all good: what the drill DAG captions."""
    directory = tmp_path_factory.mktemp("drill-clips")
    return [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS[:6]]


@pytest.fixture
def make_drill_env(s3_server: SeaweedS3, tmp_path: Path):
    """A migrated Airflow home (SQLite) loading only the drill DAG; one per simulated scheduler."""

    def make(name: str = "airflow", **extra: str) -> AirflowEnv:
        env = AirflowEnv(tmp_path / name, s3_server.env(), "postgresql://unused", extra=extra, dags_folder=DAGS)
        env.migrate()
        return env

    return make


# -- msrun -------------------------------------------------------------------------------------------------


class MsrunResult:
    def __init__(self, proc: subprocess.CompletedProcess, log_dir: Path) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.log_dir = log_dir

    def rank_logs(self) -> dict[int, list[str]]:
        out = {}
        for path in sorted(self.log_dir.glob("worker_*.log")):
            out[int(path.stem.split("_")[1])] = path.read_text(errors="replace").splitlines()
        return out

    @property
    def tail(self) -> str:
        parts = [self.stdout[-3000:]]
        for rank, lines in self.rank_logs().items():
            parts.append(f"--- rank {rank} ---\n" + "\n".join(lines[-40:]))
        return "\n".join(parts)


@pytest.fixture
def run_msrun(s3_server: SeaweedS3):
    """Run the Qwen2-VL entry script under real msrun with 2 CPU workers against the test S3 server.

    The msrun argv is the operator's (``MsrunHook.build_argv``), so the tests launch what production launches;
    the environment is this process's plus the S3 server's (the hook's allow-list is tested on its own)."""

    def run(meta: str, *args: str, log_dir: Path, env: dict[str, str] | None = None, workers: int = 2,
            model_dir: Path = TINY_QWEN2VL, script: str = "caption_qwen2vl.py", model: str | None = None,
            timeout: float = 600) -> MsrunResult:
        from operators.msrun_hook import MsrunHook, MsrunSpec

        if not (model_dir / "config.json").exists():
            pytest.fail(f"tiny model missing at {model_dir}: run `make train-tiny`", pytrace=False)
        spec = MsrunSpec(script=str(REPO / "captioning_core" / script),
                         script_args=[*([model] if model else []), meta,
                                      "--pretrained_model_name_or_path", str(model_dir), *args],
                         log_dir=str(log_dir), worker_num=workers, local_worker_num=workers,
                         master_port=free_port())
        argv = MsrunHook(spec, python=sys.executable).build_argv()
        full_env = {**os.environ, **s3_server.env(), **(env or {})}
        # msrun starts each rank as plain `python`: it must be this venv's interpreter.
        full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
        proc = subprocess.run(argv, env=full_env, cwd=log_dir.parent, capture_output=True, text=True,
                              timeout=timeout)
        return MsrunResult(proc, log_dir)

    return run
