"""docker-compose.yaml is consistent with the code (Docker can't run here, so this checks it statically)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_SERVICES = {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer", "airflow-worker-ascend", "airflow-worker"}


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def test_services_and_executor():
    services = _compose()["services"]
    assert AIRFLOW_SERVICES | {"postgres", "redis", "minio"} <= set(services)
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        # every component signs/validates tokens with the same secret and talks to the same DB
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET"), name
        assert "@postgres:5432/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert services["airflow-apiserver"]["command"] == "api-server"
    assert services["airflow-dag-processor"]["command"] == "dag-processor"


def test_ascend_queue_and_connections_match_the_dag():
    services = _compose()["services"]
    worker = services["airflow-worker-ascend"]
    assert re.search(r"celery worker .*-q ascend\b", worker["command"])
    env = worker["environment"]
    assert env["CAPTION_QUEUE"] == "ascend" and env["HCCL_CONNECT_TIMEOUT"] == "7200"
    dag_source = (REPO / "dags" / "video_curation.py").read_text()
    assert '"CAPTION_S3_CONN_ID", "caption_s3"' in dag_source and '"CAPTION_DB_CONN_ID", "curation_db"' in dag_source
    assert env["CAPTION_S3_CONN_ID"] == "caption_s3" and "AIRFLOW_CONN_CAPTION_S3" in env
    assert env["CAPTION_DB_CONN_ID"] == "curation_db" and "AIRFLOW_CONN_CURATION_DB" in env
    assert '"endpoint_url": "http://minio:9000"' in env["AIRFLOW_CONN_CAPTION_S3"]


def test_mounts_exist_and_cover_what_the_dag_needs():
    for name in AIRFLOW_SERVICES:
        service = _compose()["services"][name]
        targets = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        for target in ("/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/sql"):
            assert target in targets, (name, target)
            assert (REPO / targets[target]).is_dir()
        assert service["environment"]["CAPTION_SQL_DIR"] == "/opt/airflow/sql"
    assert (REPO / "docker" / "Dockerfile").exists() and (REPO / "docker" / "init.sh").exists()
    assert (REPO / "sql" / "schema.sql").exists()


def test_no_literal_secrets_and_loopback_ports():
    text = (REPO / "docker-compose.yaml").read_text()
    for key in ("PASSWORD", "SECRET", "FERNET_KEY"):
        for match in re.finditer(rf"{key}\w*: (.+)", text):
            assert match.group(1).strip().startswith("${"), match.group(0)
    for service in _compose()["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


# -- the compose file against the live cluster fixture (testkit.cluster): the same topology and settings ----
COMPOSE_ONLY = {"AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK", "AIRFLOW__CAPTION_GALLERY__OUTPUT_PREFIXES", "CAPTION_SQL_DIR",
                "CAPTION_WORKER_NUM", "CAPTION_NPU_POOL_SLOTS", "DUMB_INIT_SETSID", "HCCL_CONNECT_TIMEOUT",
                "_AIRFLOW_DB_MIGRATE",
                "CAPTION_RANK_USER"}  # the cluster tier's ranks run as its worker; tests/test_rank_user.py drills it


def _fixture_env(tmp_path: Path) -> tuple[dict[str, str], dict[str, str], object]:
    """The environment the cluster fixture gives every component, and the one an ascend host adds."""
    import os

    from testkit.airflow_env import AirflowEnv
    from testkit.cluster import AirflowCluster

    s3_env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    cluster = AirflowCluster(AirflowEnv(tmp_path, s3_env, "postgresql://u:p@127.0.0.1:1/c"),
                             "postgresql://u:p@127.0.0.1:1/a", "redis://:p@127.0.0.1:2/0", "logs")
    cluster.configure()
    env = {k: v for k, v in cluster.env.env().items() if os.environ.get(k) != v or k.startswith(("AIRFLOW", "CAPTION"))}
    ascend = next(h for h in cluster.hosts if h.queues == "ascend")
    return env, cluster.host_env(ascend), cluster


def test_compose_mirrors_the_cluster_fixture(tmp_path):
    from testkit import cluster as topology

    services = _compose()["services"]
    env, host_env, cluster = _fixture_env(tmp_path)
    common = services["airflow-scheduler"]["environment"]
    named = set(topology.COMPOSE_SAME_VALUE) | set(topology.COMPOSE_SAME_NAME) | set(topology.FIXTURE_ONLY)
    unclassified = sorted(k for k in {*env, *host_env} if k.startswith(("AIRFLOW", "CAPTION", "CURATION"))
                          and k not in named)
    assert not unclassified, f"the fixture sets {unclassified}: add them to docker-compose.yaml and testkit.cluster"
    for name in topology.COMPOSE_SAME_VALUE:
        assert str(common.get(name)) == env[name], (name, common.get(name), env[name])
    for name in topology.COMPOSE_SAME_NAME:
        assert name in common, f"docker-compose.yaml lacks {name}, which the tested cluster sets"
    for name in topology.FIXTURE_ONLY:
        assert name not in common or name in topology.COMPOSE_SAME_NAME, name
    compose_names = {k for s in services.values() if isinstance(s.get("environment"), dict) for k in s["environment"]
                     if k.startswith(("AIRFLOW", "CAPTION", "CURATION", "_AIRFLOW", "HCCL", "DUMB"))}
    extra = sorted(compose_names - named - COMPOSE_ONLY)
    assert not extra, f"docker-compose.yaml sets {extra}, which the tested cluster does not"

    # The same components, and one worker service per queue with the fixture's queues and NPU concurrency.
    for component, service in topology.COMPOSE_SERVICES.items():
        assert services[service]["command"] == component, service
    for host in cluster.hosts:
        command = services[topology.COMPOSE_WORKERS[host.queues]]["command"]
        assert re.search(rf"^celery worker .*-q {host.queues}\b", command), command
        if host.queues == "ascend":
            assert re.search(rf"-c {host.concurrency}\b", command), (command, host)
    assert "redis" in services and services["redis"]["image"].startswith("redis:")
    assert '"${CAPTION_POOL}"' in (REPO / "docker" / "init.sh").read_text() and common["CAPTION_POOL"] == "ascend_npus"
    assert "airflow-logs" in (REPO / "docker" / "init.sh").read_text()
    assert common["AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER"].startswith("s3://airflow-logs/")
    assert "CAPTION_MSRUN_LOG_ROOT" in host_env and "CAPTION_MSRUN_LOG_ROOT" in common
