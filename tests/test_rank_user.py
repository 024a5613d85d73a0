"""Issue 25 #7: the ranks run as an unprivileged user, so a rank (which runs FFmpeg on files whoever may upload
videos controls) cannot read the worker's secrets next door.

Through Airflow itself (`airflow dags test` of the drill DAG, real msrun with 2 workers, SeaweedFS): the worker
runs as root with ``CAPTION_RANK_USER=caption-rank`` (scripts/setup.sh creates the user). Each rank, first thing,
tries to read what it must not (the ``probe_reach`` fault): every ancestor process's ``/proc/<pid>/environ``
and working directory (the task process, the task supervisor, ``airflow dags test``: Fernet key, database URI,
connections), the Airflow home and its ``airflow.cfg``. Without a rank user the same probe reads them all (the
second run), which is what an environment allow-list alone leaves open.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from testkit.drill_dag import DAG_ID, DATE, drill_conf, rank_lines
from testkit.outputs import assert_all_captioned, read_output
from testkit.partition import upload_partition

pytestmark = [pytest.mark.integration, pytest.mark.msrun, pytest.mark.e2e]
RANK_USER = "caption-rank"


@pytest.fixture
def world_log_root():
    """msrun's log root where the rank user can reach it (pytest's own tmp dirs are root's alone)."""
    root = tempfile.mkdtemp(prefix="caption-rank-drill-")
    os.chmod(root, 0o755)
    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


def _probes(root: Path) -> list[dict]:
    lines = [ln for per_try in rank_lines(root, "reach probe ").values() for ln in per_try]
    return [json.loads(ln.split("reach probe ", 1)[1]) for ln in lines]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching the ranks to another user needs a root worker")
@pytest.mark.parametrize("rank_user", [RANK_USER, ""])
def test_ranks_cannot_read_the_workers_secrets(make_drill_env, s3_server, s3_bucket, drill_clips,
                                              world_log_root, rank_user):
    uid = pwd.getpwnam(RANK_USER).pw_uid  # KeyError: run scripts/setup.sh, which creates the user
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, f"drill-rankuser-{rank_user or 'none'}", drill_clips[:3])
    output = meta.replace("meta.csv", "captions.csv")
    env = make_drill_env(CAPTION_FAULTS="probe_reach@*", CAPTION_RANK_USER=rank_user,
                         CAPTION_MSRUN_LOG_ROOT=str(world_log_root))
    secrets = [str(env.home), str(env.home / "airflow.cfg"), str(env.home / "airflow.db")]
    env.extra["CAPTION_PROBE_PATHS"] = os.pathsep.join(secrets)
    proc = env.dags_test(DAG_ID, DATE, drill_conf(meta, output))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert_all_captioned(read_output(client, output), rows)  # the ranks did their work as that user

    probes = _probes(world_log_root)
    assert len(probes) == 2, probes  # one per rank
    for probe in probes:
        assert probe["paths"]["/proc/self/environ"] == "read" and probe["paths"]["/etc/hostname"] == "read"
        workers = [a for a in probe["ancestors"] if a["uid"] != probe["uid"]]
        if rank_user:
            assert probe["uid"] == uid
            assert len(workers) >= 2, probe  # the task process, its supervisor, airflow dags test, ...
            assert all(a["environ"] == "PermissionError" and a["cwd"] == "PermissionError" for a in workers), probe
            assert all(probe["paths"][p] == "PermissionError" for p in secrets), probe
        else:  # the control: as the worker's own user, every one of them is readable
            assert probe["uid"] == 0 and not workers
            assert all(a["environ"] == "read" for a in probe["ancestors"]), probe
            assert all(probe["paths"][p] == "read" for p in secrets), probe
