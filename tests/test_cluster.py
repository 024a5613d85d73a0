"""The production shape, live: CeleryExecutor on PostgreSQL + Redis, two ascend workers standing in for two NPU
hosts, real msrun (2 CPU ranks, tiny Qwen2-VL), real SeaweedFS. Backfills over partitions, re-running one
partition by key, and losing a host mid-caption.

One cluster serves the module (starting it costs about a minute); the tests run in file order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
import time
import uuid
from datetime import datetime

import pytest

from curation import metadb
from testkit.airflow_env import TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.clips import ensure_clip
from testkit.cluster import AirflowCluster, default_hosts, pool_size
from testkit.demo_clips import DAG_SPECS
from testkit.process import wait_for
from testkit.redis_server import RedisServer

pytestmark = [pytest.mark.cluster, pytest.mark.msrun, pytest.mark.integration]
log = logging.getLogger(__name__)

DAG = "video_curation"
# Three partitions of new videos, two each; D4 (six videos) is the one whose host dies.
PARTITIONS = {"2026-11-20": DAG_SPECS[0:2], "2026-11-21": DAG_SPECS[2:4], "2026-11-22": DAG_SPECS[4:6]}
LOST = "2026-11-23"


@pytest.fixture(scope="module")
def world(s3_server, pg_server, tmp_path_factory):
    started = time.monotonic()
    suffix = uuid.uuid4().hex[:6]
    bucket = s3_server.create_bucket(f"curation-{suffix}")
    log_bucket = s3_server.create_bucket(f"airflow-logs-{suffix}")
    client = s3_server.client()
    clip_dir = tmp_path_factory.mktemp("cluster-clips")
    expected: dict[str, dict[str, str]] = {}
    for key, specs in {**PARTITIONS, LOST: DAG_SPECS}.items():
        for spec in specs:
            obj = f"incoming/{key}/{spec.filename}"
            client.upload_file(str(ensure_clip(spec, clip_dir)), bucket, obj)
            expected.setdefault(key, {})[f"s3://{bucket}/{obj}"] = spec.caption
    pg_server.create_database(f"curation_{suffix}")
    pg_server.create_database(f"airflow_{suffix}")
    conn = pg_server.connect(f"curation_{suffix}")
    metadb.apply_schema(conn)
    env = AirflowEnv(tmp_path_factory.mktemp("cluster"), s3_server.env(), pg_server.uri_for(f"curation_{suffix}"),
                     extra={"CAPTION_RETRY_DELAY_SECONDS": "2", "CURATION_RETRY_DELAY_SECONDS": "5"})
    with RedisServer() as redis, AirflowCluster(env, pg_server.uri_for(f"airflow_{suffix}"), redis.url(),
                                                log_bucket) as cluster:
        log.info("cluster started in %.1fs", time.monotonic() - started)
        cluster.wait_for_dag(DAG)
        cluster.api("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})
        yield cluster, bucket, client, conn, expected
    conn.close()


def _conf(bucket: str, **options) -> dict:
    return {"bucket": bucket, "shard_size": 10, "caption_options": {**TINY_CAPTION_OPTIONS, **options}}


def _table(conn, key: str) -> dict[str, tuple]:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT path, filter_status, text, caption_status, captioned_at, meta_uri FROM video_meta "
                    "WHERE partition_key = %s", (key,))
        return {row[0]: row[1:] for row in cur.fetchall()}


def _objects(client, bucket: str) -> dict[str, tuple]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            out[o["Key"]] = (o["LastModified"], hashlib.sha256(body).hexdigest())
    return out


def _manifest(client, bucket: str, key: str) -> dict[str, str]:
    body = client.get_object(Bucket=bucket, Key=f"manifests/{key}/train_manifest.csv")["Body"].read().decode()
    return {r["path"]: r["text"] for r in csv.DictReader(io.StringIO(body))}


def _max_overlap(intervals: list[tuple]) -> int:
    """Most intervals open at one instant (end == start of another does not overlap)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    most = cur = 0
    for _, step in events:
        cur += step
        most = max(most, cur)
    return most


def _backfill(cluster: AirflowCluster, bucket: str, *extra: str) -> dict:
    import json

    keys = sorted(PARTITIONS)
    return cluster.backfill(DAG, keys[0], keys[-1], "--max-active-runs", "2",
                            "--dag-run-conf", json.dumps(_conf(bucket)), *extra)


def test_backfill_three_partitions_then_reprocess_and_rerun_one(world):
    cluster, bucket, client, conn, expected = world
    t0 = time.monotonic()
    backfill = _backfill(cluster, bucket)
    log.info("backfill %s: %s", backfill["id"], backfill["runs"])
    runs = cluster.wait_for_runs(DAG, set(PARTITIONS))
    first_seconds = time.monotonic() - t0
    log.info("backfill of 3 partitions: %.1fs", first_seconds)
    assert {r["partition_key"]: r["state"] for r in runs} == {k: "success" for k in PARTITIONS}, cluster.tail("scheduler")
    assert all(r["run_type"] == "backfill" for r in runs)
    spans = [(datetime.fromisoformat(r["start_date"]), datetime.fromisoformat(r["end_date"])) for r in runs]
    assert _max_overlap(spans) <= 2, spans  # --max-active-runs 2

    for key in PARTITIONS:
        table = _table(conn, key)
        assert {p: (row[0], row[2], row[1]) for p, row in table.items()} == {
            p: ("kept", "ok", caption) for p, caption in expected[key].items()}, key
        assert all(row[4].startswith(f"s3://{bucket}/meta/{key}/") for row in table.values())
        assert _manifest(client, bucket, key) == expected[key]

    # The training consumer (PartitionedAssetTimetable) ran once per partition, with the same key.
    trained = cluster.wait_for_runs("train_on_manifest", set(PARTITIONS), timeout=300)
    assert all(r["state"] == "success" for r in trained), trained
    checked = {rid: r for rid, _, r in cluster.xcom("train_on_manifest", "check_manifests")}
    for r in trained:
        assert [(c["partition_key"], c["rows"]) for c in checked[r["dag_run_id"]]] == [
            (r["partition_key"], len(expected[r["partition_key"]]))]

    tries = [t for t in cluster.task_tries(DAG, "caption") if t["partition_key"] in PARTITIONS]
    assert len(tries) == 3 and all(t["state"] == "success" and t["try_number"] == 1 for t in tries), tries
    hosts = {t["hostname"] for t in tries}
    assert hosts == {"ascend-0", "ascend-1"}, tries  # both NPU hosts took caption tasks
    ascend = [h for h in default_hosts() if "ascend" in h.queues]
    for host in ascend:
        spans = [(t["start_date"], t["end_date"]) for t in tries if t["hostname"] == host.name]
        assert _max_overlap(spans) <= host.concurrency, (host, spans)
    assert _max_overlap([(t["start_date"], t["end_date"]) for t in tries]) <= pool_size(default_hosts())
    for t in tries:
        log.info("caption %s on %s: %.1fs (queued %.1fs before start)", t["partition_key"], t["hostname"],
                 (t["end_date"] - t["start_date"]).total_seconds(),
                 (t["start_date"] - t["queued_dttm"]).total_seconds() if t["queued_dttm"] else -1)
    run_ids = {r["dag_run_id"] for r in runs}
    assert all(r["launched"] for rid, _, r in cluster.xcom(DAG, "caption") if rid in run_ids)

    # Remote logging: every try's log comes from S3 through the API server, rank progress lines included.
    for t in tries:
        text = cluster.task_log(DAG, t["run_id"], "caption", t["try_number"], t["map_index"])
        assert "rank 0/2" in text and "rank 1/2" in text, text[-3000:]
    logs = client.list_objects_v2(Bucket=cluster.log_bucket)
    assert logs.get("KeyCount", 0) >= 3 * 4  # scrape, filter, caption, train per run

    # Second backfill over the same range, reprocessing completed runs: nothing launched, rewritten or changed.
    objects = _objects(client, bucket)
    tables = {key: _table(conn, key) for key in PARTITIONS}
    first_runs = {r["dag_run_id"]: r["end_date"] for r in runs}
    t0 = time.monotonic()
    backfill = _backfill(cluster, bucket, "--reprocess-behavior", "completed")
    log.info("reprocess backfill %s: %s (%.1fs)", backfill["id"], backfill["runs"], time.monotonic() - t0)
    assert [row[:3] for row in backfill["runs"]] == [(k, "success", None) for k in sorted(PARTITIONS)]
    again = {row[3] for row in backfill["runs"]}
    assert not again & set(first_runs)  # partitioned DAG: new runs per key (3.3.2), see AirflowCluster.backfill
    results = [x for x in cluster.xcom(DAG, "caption") if x[0] in again]
    assert len(results) == 3 and not any(r["launched"] for _, _, r in results), results
    assert all(r["rows"] == len(expected[k]) for (_, _, r), k in zip(sorted(results), sorted(PARTITIONS),
                                                                     strict=True))
    assert _objects(client, bucket) == objects
    assert {key: _table(conn, key) for key in PARTITIONS} == tables

    # Re-run one partition by its key: only that partition's runs are cleared and run again.
    key = sorted(PARTITIONS)[1]
    before = {r["dag_run_id"]: (r["partition_key"], r["end_date"]) for r in cluster.runs(DAG)}
    t0 = time.monotonic()
    cluster.env.airflow("dags", "clear", DAG, "--partition-key", key, "--yes")
    deadline = time.monotonic() + 900
    while True:
        now = {r["dag_run_id"]: (r["state"], r["end_date"]) for r in cluster.runs(DAG)}
        rerun = [rid for rid, (k, end) in before.items() if k == key]
        if all(now[rid][0] == "success" and now[rid][1] != before[rid][1] for rid in rerun):
            break
        assert time.monotonic() < deadline, (now, cluster.tail("scheduler"))
        time.sleep(3)
    log.info("re-run of partition %s (%d runs): %.1fs", key, len(rerun), time.monotonic() - t0)
    untouched = {rid: end for rid, (k, end) in before.items() if k != key}
    assert {rid: now[rid][1] for rid in untouched} == untouched  # other partitions' runs never ran again
    assert _objects(client, bucket) == objects
    assert {k: _table(conn, k) for k in PARTITIONS} == tables


def test_host_lost_mid_caption_retries_on_the_other_host(world):
    cluster, bucket, client, conn, expected = world
    run_id = cluster.trigger(DAG, LOST, _conf(bucket, bs=1))  # a manual run for one key, through the API

    def caption_try() -> dict | None:
        live = [t for t in cluster.task_tries(DAG, "caption") if t["run_id"] == run_id and t["state"] == "running"]
        return live[0] if live else None

    deadline = time.monotonic() + 900
    victim = None
    parts_prefix = None
    while True:
        assert time.monotonic() < deadline, cluster.tail("scheduler")
        victim = victim or caption_try()
        if victim and parts_prefix is None:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=f"meta/{LOST}/").get("Contents", [])
            metas = [o["Key"] for o in listed if o["Key"].endswith("/meta.csv")]
            if metas:
                parts_prefix = metas[0][:-len(".csv")] + "_caption_qwen2vl.csv.parts/"
        if parts_prefix and client.list_objects_v2(Bucket=bucket, Prefix=parts_prefix).get("KeyCount", 0) >= 1:
            break  # at least one batch is journaled, the rest is in flight
        time.sleep(0.5)
    lost_host = victim["hostname"]
    other = "ascend-1" if lost_host == "ascend-0" else "ascend-0"
    journaled_before = client.list_objects_v2(Bucket=bucket, Prefix=parts_prefix)["KeyCount"]
    killed_at, pids = cluster.kill_host(lost_host)
    log.info("killed host %s (%d processes) with %d journal parts written", lost_host, len(pids), journaled_before)

    runs = None
    while True:
        assert time.monotonic() < deadline, cluster.tail("scheduler")
        runs = [r for r in cluster.runs(DAG, {LOST}) if r["dag_run_id"] == run_id]
        if runs and runs[0]["state"] in ("success", "failed"):
            break
        time.sleep(3)
    assert runs[0]["state"] == "success", cluster.tail("scheduler", 120)
    tries = sorted((t for t in cluster.task_tries(DAG, "caption") if t["run_id"] == run_id),
                   key=lambda t: t["try_number"])
    assert [(t["try_number"], t["hostname"]) for t in tries] == [(1, lost_host), (2, other)], tries
    assert tries[0]["state"] in ("failed", "up_for_retry") and tries[1]["state"] == "success", tries
    retry_start = tries[1]["start_date"].timestamp()
    log.info("HOST LOSS: kill -> retry start %.1fs (heartbeat timeout %ds, lease ttl %ds); retry ran %.1fs",
             retry_start - killed_at, cluster.heartbeat_timeout, cluster.lease_ttl,
             (tries[1]["end_date"] - tries[1]["start_date"]).total_seconds())

    # The retry resumed from the journal: its ranks found rows already done; every row is there exactly once.
    run_dir = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", run_id)
    retry_logs = [p for p in cluster.msrun_log_root(other).rglob("worker_*.log") if run_dir in str(p)]
    done = [int(m.group(1)) for p in retry_logs for m in re.finditer(r"(\d+) already done", p.read_text())]
    assert len(done) == 2 and sum(done) >= 1, (retry_logs, done)
    result = [r for rid, _, r in cluster.xcom(DAG, "caption") if rid == run_id][0]
    assert result["launched"] and result["rows"] == len(DAG_SPECS) and result["skipped"] >= 1, result
    output = client.get_object(Bucket=bucket, Key=result["output"].split("/", 3)[3])["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(output)))
    assert sorted(r["path"] for r in rows) == sorted(expected[LOST])
    assert {r["path"]: r["text"] for r in rows} == expected[LOST]
    table = _table(conn, LOST)
    assert {p: (row[2], row[1]) for p, row in table.items()} == {p: ("ok", c) for p, c in expected[LOST].items()}
    assert _manifest(client, bucket, LOST) == expected[LOST]

    # Both tries' logs through the API server, rank progress included: the retry's from S3 (remote logging),
    # the dead try's from the shared log folder (its host never uploaded it).
    retry_text = cluster.task_log(DAG, run_id, "caption", 2, 0)
    assert "rank 0/2" in retry_text and "already done" in retry_text, retry_text[-3000:]
    dead_text = cluster.task_log(DAG, run_id, "caption", 1, 0)
    log.info("dead try's log through the API (%d chars), last lines: %s", len(dead_text), dead_text[-800:])
    assert "rank 0/2" in dead_text, dead_text[-3000:]
    # The worker's supervisor uploads a try's log after it reports the try's state, so the run can be
    # "success" a moment before the upload lands: wait for it rather than read the bucket once.
    def caption_logs() -> list[str]:
        uploaded = client.list_objects_v2(Bucket=cluster.log_bucket).get("Contents", [])
        return [o["Key"] for o in uploaded if f"run_id={run_id}/task_id=caption/" in o["Key"]]

    try:
        keys = wait_for(lambda: [k for k in caption_logs() if "attempt=2" in k] and caption_logs(), 90,
                        "the retry's log upload", interval=1)
    except AssertionError as err:
        raise AssertionError(f"{err}; worker-{other} log:\n{cluster.tail(f'worker-{other}', 80)}") from None
    assert not any("attempt=1" in k for k in keys), keys
