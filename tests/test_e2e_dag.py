"""The whole curation DAG with `airflow dags test`: real PostgreSQL, SeaweedFS, msrun (2 CPU workers), tiny model."""

from __future__ import annotations

import csv
import io
import uuid

import psycopg2
import pytest

from curation import metadb
from testkit.airflow_env import TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.clips import ClipSpec, ensure_clip
from testkit.demo_clips import DAG_SPECS

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]

KEY = "2026-11-20"
GOOD = list(DAG_SPECS)
LATE = ClipSpec("green", "right", "circle", 640, 360, 30, 1.0, 1)  # held out, not in DAG_SPECS


@pytest.fixture
def curation_world(s3_server, pg_server, tmp_path_factory, broken_clips):
    bucket = s3_server.create_bucket(f"curation-{uuid.uuid4().hex[:8]}")
    client = s3_server.client()
    clip_dir = tmp_path_factory.mktemp("e2e-clips")
    expected = {}
    for spec in GOOD:
        key = f"incoming/{KEY}/{spec.filename}"
        client.upload_file(str(ensure_clip(spec, clip_dir)), bucket, key)
        expected[f"s3://{bucket}/{key}"] = spec.caption
    for kind in ("garbage", "one_frame"):  # unreadable, and too short for min_frames
        client.upload_file(str(broken_clips[kind]), bucket, f"incoming/{KEY}/{kind}.mp4")
    client.put_object(Bucket=bucket, Key=f"incoming/{KEY}/notes.txt", Body=b"not a video")
    dbname = f"curation_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(dbname)
    conn = pg_server.connect(dbname)
    metadb.apply_schema(conn)
    env = AirflowEnv(tmp_path_factory.mktemp("airflow"), s3_server.env(), pg_server.uri_for(dbname))
    env.migrate()
    yield env, bucket, client, conn, expected
    conn.close()


def _table(conn) -> dict[str, tuple]:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT path, filter_status, text, caption_status, captioned_at, meta_uri FROM video_meta "
                    "WHERE partition_key = %s", (KEY,))
        return {row[0]: row[1:] for row in cur.fetchall()}


def test_curation_dag_end_to_end_and_idempotent_rerun(curation_world):
    env, bucket, client, conn, expected = curation_world
    conf = {"bucket": bucket, "shard_size": 3, "caption_options": TINY_CAPTION_OPTIONS}
    first = env.dags_test("video_curation", KEY, conf)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-6000:]

    table = _table(conn)
    assert len(table) == len(GOOD) + 2  # notes.txt is not a video
    for path, caption in expected.items():
        status, text, cap_status = table[path][0], table[path][1], table[path][2]
        assert (status, cap_status, text) == ("kept", "ok", caption), path
    assert table[f"s3://{bucket}/incoming/{KEY}/garbage.mp4"][0] == "unreadable"
    assert table[f"s3://{bucket}/incoming/{KEY}/one_frame.mp4"][0] == "dropped"
    shards = {row[4] for row in table.values() if row[4]}
    assert len(shards) == 2  # 5 kept videos, shard_size 3

    manifest_key = f"manifests/{KEY}/train_manifest.csv"
    manifest = list(csv.DictReader(io.StringIO(client.get_object(Bucket=bucket, Key=manifest_key)["Body"]
                                               .read().decode())))
    assert {r["path"]: r["text"] for r in manifest} == expected
    assert all(r["num_frames"] and r["fps"] and r["height"] and r["width"] for r in manifest)
    msrun_runs = sorted(p for p in env.msrun_log_root.rglob("worker_0.log"))
    assert len(msrun_runs) == 2  # one msrun per shard

    # Credentials reach the ranks through their environment only: never a log, argv, XCom or the Airflow DB.
    secret = env.s3_env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in first.stdout + first.stderr
    for path in [*env.msrun_log_root.rglob("*"), env.home / "airflow.db", *env.home.glob("logs/**/*")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path

    # The same logical date again: nothing changes and no msrun is launched.
    before = _objects(client, bucket)
    second = env.dags_test("video_curation", KEY, conf)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-6000:]
    assert _objects(client, bucket) == before  # same keys, same bytes, never rewritten
    assert _table(conn) == table
    assert sorted(p for p in env.msrun_log_root.rglob("worker_0.log")) == msrun_runs

    # A late video (its name sorts first) joins the partition: the rerun captions exactly that one row, in a
    # shard of its own; every object that existed is byte-identical except the manifest, which gains it.
    late_key = f"incoming/{KEY}/000-late-{LATE.filename}"
    client.upload_file(str(ensure_clip(LATE, env.home)), bucket, late_key)
    before = _objects(client, bucket)
    third = env.dags_test("video_curation", KEY, conf)
    assert third.returncode == 0, third.stdout[-6000:] + third.stderr[-6000:]
    results = env.task_results("video_curation", "caption")
    last_run = max(run_id for run_id, *_ in results)
    launched = [r for run_id, _, r in results if run_id == last_run and r["launched"]]
    assert [(r["rows"], r["captioned"], r["skipped"]) for r in launched] == [(1, 1, 0)]
    after = _objects(client, bucket)
    manifest_key = f"manifests/{KEY}/train_manifest.csv"
    assert {k: v for k, v in after.items() if k in before and k != manifest_key} == {
        k: v for k, v in before.items() if k != manifest_key}
    assert after[manifest_key] != before[manifest_key]
    assert all(k.startswith(launched[0]["output"].split("/", 3)[3].rsplit("/", 1)[0] + "/") or k == manifest_key
               for k in set(after) - set(before)), sorted(set(after) - set(before))
    late_row = _table(conn)[f"s3://{bucket}/{late_key}"]
    assert (late_row[0], late_row[2], late_row[1]) == ("kept", "ok", LATE.caption)
    assert {p: r for p, r in _table(conn).items() if p in table} == table  # no other row changed

    # A captioned video is replaced in place (same key, other bytes; issue 25 #5): the rerun captions exactly
    # that row again, in a new shard, with its new content's caption; no other row changes or is recomputed.
    replaced = f"s3://{bucket}/incoming/{KEY}/{GOOD[0].filename}"
    assert table[replaced][1] == GOOD[0].caption != LATE.caption
    client.upload_file(str(ensure_clip(LATE, env.home)), bucket, replaced.split("/", 3)[3])
    table = _table(conn)
    fourth = env.dags_test("video_curation", KEY, conf)
    assert fourth.returncode == 0, fourth.stdout[-6000:] + fourth.stderr[-6000:]
    results = env.task_results("video_curation", "caption")
    last_run = max(run_id for run_id, *_ in results)
    launched = [r for run_id, _, r in results if run_id == last_run and r["launched"]]
    assert [(r["rows"], r["captioned"], r["skipped"]) for r in launched] == [(1, 1, 0)]
    after = _table(conn)
    assert sorted(after) == sorted(table)  # no row lost or added
    assert (after[replaced][0], after[replaced][2], after[replaced][1]) == ("kept", "ok", LATE.caption)
    new_shard = after[replaced][4]
    assert new_shard != table[replaced][4] and launched[0]["output"].startswith(new_shard.rsplit("/", 1)[0] + "/")
    assert {p: r for p, r in after.items() if p != replaced} == {p: r for p, r in table.items() if p != replaced}
    manifest = list(csv.DictReader(io.StringIO(client.get_object(Bucket=bucket, Key=manifest_key)["Body"]
                                               .read().decode())))
    assert [r["path"] for r in manifest] == sorted({*expected, f"s3://{bucket}/{late_key}"})
    assert {r["path"]: r["text"] for r in manifest}[replaced] == LATE.caption


def test_a_row_planted_outside_the_partition_fails_unread_under_the_dags_allowed_root(curation_world, s3_server):
    """Issue 25 #8 through Airflow: the metadata table gains a row of this partition that scrape never listed,
    naming a real video in another bucket (the filter probes it with its own, broad connection and keeps it).
    The caption task's ranks get the partition's prefix as their only allowed root (video_curation's default),
    so the row fails unread and the partition's own videos are captioned."""
    env, bucket, client, conn, expected = curation_world
    other = s3_server.create_bucket(f"other-{uuid.uuid4().hex[:8]}")
    client.upload_file(str(ensure_clip(LATE, env.home)), other, "private/planted.mp4")
    planted = f"s3://{other}/private/planted.mp4"
    metadb.ensure_partition(conn, KEY)
    metadb.run_many(conn, "register", [{"partition_key": KEY, "path": planted, "size_bytes": 1,
                                        "video_etag": None, "video_modified": None}])
    conf = {"bucket": bucket, "shard_size": 100, "caption_options": TINY_CAPTION_OPTIONS}
    run = env.dags_test("video_curation", KEY, conf)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]

    root = f"s3://{bucket}/incoming/{KEY}/"
    [(_, _, shards)] = env.task_results("video_curation", "filter")
    assert [s["allowed_roots"] for s in shards] == [[root]], shards
    with conn, conn.cursor() as cur:
        cur.execute("SELECT path, filter_status, caption_status, caption_error, text FROM video_meta "
                    "WHERE partition_key = %s", (KEY,))
        table = {row[0]: row[1:] for row in cur.fetchall()}
    status, caption_status, error, text = table[planted]
    assert (status, caption_status, text) == ("kept", "failed", ""), table[planted]
    assert "outside the allowed roots" in error and root in error, error
    assert {p: (table[p][0], table[p][1], table[p][3]) for p in expected} == {
        p: ("kept", "ok", caption) for p, caption in expected.items()}


def test_database_down_at_write_back_then_the_airflow_retry_completes(curation_world, pg_server):
    """Drill 8 through Airflow: PostgreSQL is down when `train` starts its write-back; that try fails,
    the database comes back, and Airflow's retry writes every caption."""
    import sqlite3
    import threading
    import time

    env, bucket, client, conn, expected = curation_world
    dbname = conn.info.dbname
    conn.close()  # this session would not survive the restart
    env.extra["CURATION_RETRY_DELAY_SECONDS"] = "8"
    conf = {"bucket": bucket, "shard_size": 3, "caption_options": TINY_CAPTION_OPTIONS}
    box = {}
    runner = threading.Thread(target=lambda: box.update(proc=env.dags_test("video_curation", KEY, conf)))
    runner.start()

    def train_waits_for_retry() -> bool:
        try:
            return any(state == "up_for_retry" for *_, state in env.task_tries("video_curation", "train"))
        except sqlite3.Error:  # the DB is busy while `dags test` writes it
            return False

    deadline = time.monotonic() + 900
    while not list(env.msrun_log_root.rglob("worker_0.log")):  # scrape and filter are done: caption runs
        assert runner.is_alive() and time.monotonic() < deadline, box
        time.sleep(0.5)
    pg_server.stop()
    try:
        while not train_waits_for_retry():
            assert runner.is_alive() and time.monotonic() < deadline, box
            time.sleep(0.2)
    finally:
        pg_server.start()
    runner.join(timeout=900)
    proc = box["proc"]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert [(t, s) for _, t, s in env.task_tries("video_curation", "train")] == [(1, "failed"), (2, "success")]
    conn = pg_server.connect(dbname)
    try:
        table = _table(conn)
    finally:
        conn.close()
    assert {p: (row[0], row[2], row[1]) for p, row in table.items() if p in expected} == {
        p: ("kept", "ok", caption) for p, caption in expected.items()}


def _objects(client, bucket: str) -> dict[str, tuple]:
    """Every object's (last-modified, sha256 of its bytes)."""
    import hashlib

    return {o["Key"]: (o["LastModified"], hashlib.sha256(client.get_object(Bucket=bucket, Key=o["Key"])["Body"]
                                                         .read()).hexdigest())
            for o in client.list_objects_v2(Bucket=bucket)["Contents"]}


def test_schema_applies_twice(pg_database):
    conn = psycopg2.connect(pg_database)
    try:
        metadb.apply_schema(conn)
        metadb.apply_schema(conn)
        metadb.ensure_partition(conn, "k'; DROP TABLE video_meta; --")
        metadb.run(conn, "register", {"partition_key": "k'; DROP TABLE video_meta; --", "path": "s3://b/x.mp4",
                                      "size_bytes": 1, "video_etag": "e", "video_modified": None})
        rows = metadb.run(conn, "select_partition", {"partition_key": "k'; DROP TABLE video_meta; --"})
        assert [r[0] for r in rows] == ["s3://b/x.mp4"]
    finally:
        conn.close()


def test_metadb_works_with_psycopg3_connections(pg_server, pg_database):
    """PostgresHook hands out psycopg 3 connections; the same code must work on them."""
    import psycopg

    conn = psycopg.connect(pg_database)
    try:
        metadb.apply_schema(conn)
        metadb.ensure_partition(conn, "k3")
        metadb.run_many(conn, "register", [{"partition_key": "k3", "path": f"s3://b/{i}.mp4", "size_bytes": i,
                                            "video_etag": None, "video_modified": None}
                                           for i in range(3)])
        assert [r[0] for r in metadb.run(conn, "select_partition", {"partition_key": "k3"})] == [
            "s3://b/0.mp4", "s3://b/1.mp4", "s3://b/2.mp4"]
        assert not conn.closed
    finally:
        conn.close()
