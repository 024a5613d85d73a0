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
