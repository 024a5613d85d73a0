"""``make demo DEMO_ARGS=--cluster``: the same DAG on the local production shape (testkit.cluster).

Redis + CeleryExecutor on PostgreSQL, scheduler, dag-processor, triggerer, a default-queue worker and two
``ascend`` workers standing in for two NPU hosts. The clips are split over two daily partitions and backfilled
with ``airflow backfill create``; each partition's captions are printed with the host that captioned it.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from datetime import date, timedelta
from pathlib import Path

from testkit.airflow_env import TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.cluster import AirflowCluster
from testkit.redis_server import RedisServer

log = logging.getLogger("demo")
DAG = "video_curation"


def partition_keys(first: str, count: int = 2) -> list[str]:
    start = date.fromisoformat(first)
    return [(start + timedelta(days=i)).isoformat() for i in range(count)]


def run(airflow: AirflowEnv, airflow_db_uri: str, log_bucket: str, bucket: str, keys: list[str], *,
        ui: bool, grid_png: str | None, wait_for_ctrl_c) -> dict[str, dict]:
    """Backfill ``keys`` on a started cluster; returns {key: {"state", "host", "seconds"}}."""
    with RedisServer() as redis, AirflowCluster(airflow, airflow_db_uri, redis.url(), log_bucket) as cluster:
        cluster.wait_for_dag(DAG)
        cluster.api("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})
        conf = {"bucket": bucket, "shard_size": 4, "caption_options": TINY_CAPTION_OPTIONS}
        log.info("backfilling partitions %s on the Celery cluster (2 ascend hosts, pool ascend_npus)", keys)
        started = time.monotonic()
        cluster.env.airflow("backfill", "create", "--dag-id", DAG, "--from-date", keys[0], "--to-date", keys[-1],
                            "--max-active-runs", "2", "--dag-run-conf", json.dumps(conf))
        runs = cluster.wait_for_runs(DAG, set(keys))
        log.info("backfill done in %.0f s", time.monotonic() - started)
        report = {r["partition_key"]: {"state": r["state"], "run_id": r["dag_run_id"], "hosts": set()} for r in runs}
        for t in cluster.task_tries(DAG, "caption"):
            if t["partition_key"] in report:
                report[t["partition_key"]]["hosts"].add(t["hostname"])
        if grid_png:
            from testkit import browser

            grid = f"{cluster.base_url}/dags/{DAG}"
            browser.screenshot(grid, grid_png, size=(1400, 820), wait_ms=25000)
            log.info("grid screenshot saved to %s", grid_png)
            runs_png = str(Path(grid_png).with_name(Path(grid_png).stem + "_runs.png"))
            browser.screenshot(f"{grid}/runs", runs_png, size=(1900, 620), wait_ms=25000)
            log.info("runs list (partition keys) saved to %s", runs_png)
        if ui:
            first = urllib.parse.quote(runs[0]["dag_run_id"], safe="")
            print(f"\nAirflow UI (Celery cluster): {cluster.base_url}/dags/{DAG}  (no login)\n"  # noqa: T201
                  f"first run: {cluster.base_url}/dags/{DAG}/runs/{first}\n"
                  f"component logs: {cluster.env.home}/*.log\nCtrl-C stops everything.")
            wait_for_ctrl_c()
        return report
