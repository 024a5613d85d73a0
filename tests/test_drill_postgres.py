"""Drill 8: PostgreSQL restarts while the `train` task writes captions back (real PostgreSQL and SeaweedFS).

The write-back upserts every caption of a partition in one transaction. A restart in the middle of that
transaction must fail the attempt with a connection error and leave nothing of it behind; the retry (the
Airflow task's next try, on a fresh connection) must then complete with each row holding exactly its caption.

The restart lands mid-transaction by construction, not by timing: a second session holds a row lock on the
row in the middle of the write-back, so the upsert writes the first half, then waits on that lock and cannot
commit. The test restarts the server only once pg_stat_activity shows the writer inside its INSERT, with a
transaction id (it has written rows) and blocked by exactly that session. If the write-back ends before that
(nothing locked, wrong row), the test fails; if the server restarted before it began, the write-back would not
reach the lock and the test fails too.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
import uuid

import psycopg
import psycopg2
import pytest

from curation import metadb, steps

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

KEY = "2026-12-01"
ROWS = 50_000  # a whole write-back of these takes seconds here: about 1.5-2.5 s with psycopg 3, 4-9 s with psycopg2
SHARDS = 4
MODEL = "qwen2vl"
OLD_MODEL = "pllava"  # every 10th row was captioned by an earlier run before this one
LOCKED_ROW = ROWS // 2
WAIT_LIMIT = 600.0  # seconds; only a guard against hanging forever on a stuck test, never a measurement

# driver name -> (connect(dsn), backend pid of a connection, the driver's OperationalError)
DRIVERS = {
    "psycopg3": (psycopg.connect, lambda conn: conn.info.backend_pid, psycopg.OperationalError),
    "psycopg2": (psycopg2.connect, lambda conn: conn.get_backend_pid(), psycopg2.OperationalError),
}


def _path(bucket: str, i: int) -> str:
    return f"s3://{bucket}/incoming/{KEY}/clip-{i:06d}.mp4"


def _caption(i: int) -> tuple[str, str, str | None]:
    """(text, caption_status, caption_error) that the caption task produced for row ``i``."""
    if i % 97 == 0:
        return "", "failed", "VideoError: no decodable frames"
    return f'clip {i}, a "red" circle moving left — frame {i % 13}', "ok", None


class World:
    """A partition of ROWS registered, kept videos and the caption outputs of its shards on S3."""

    def __init__(self, pg_server, s3_server, bucket: str) -> None:
        self.pg = pg_server
        self.bucket = bucket
        self.s3 = s3_server.client()
        self.dbname = f"drill_{uuid.uuid4().hex[:12]}"
        self.dsn = pg_server.create_database(self.dbname)
        self.paths = [_path(bucket, i) for i in range(ROWS)]
        conn = pg_server.connect(self.dbname)
        try:
            metadb.apply_schema(conn)
            metadb.ensure_partition(conn, KEY)
            with metadb.transaction(conn) as cur:
                cur.execute(
                    "INSERT INTO video_meta (partition_key, path, size_bytes, num_frames, fps, height, width, "
                    "filter_status, text, caption_status, caption_model, captioned_at) "
                    "SELECT %(key)s, %(prefix)s || lpad(i::text, 6, '0') || '.mp4', 1000 + i, 48, 24, 224, 224, "
                    "'kept', CASE WHEN i %% 10 = 0 THEN 'old caption ' || i END, "
                    "CASE WHEN i %% 10 = 0 THEN 'ok' END, CASE WHEN i %% 10 = 0 THEN %(old)s END, "
                    "CASE WHEN i %% 10 = 0 THEN now() END "
                    "FROM generate_series(0, %(n)s - 1) AS i",
                    {"key": KEY, "prefix": f"s3://{bucket}/incoming/{KEY}/clip-", "old": OLD_MODEL, "n": ROWS})
        finally:
            conn.close()
        self.results = []
        per_shard = ROWS // SHARDS
        for shard in range(SHARDS):
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["path", "num_frames", "fps", "height", "width", "text", "caption_status",
                             "caption_error"])
            for i in range(shard * per_shard, (shard + 1) * per_shard):
                text, status, error = _caption(i)
                writer.writerow([self.paths[i], 48, 24, 224, 224, text, status, error or ""])
            key = f"meta/{KEY}/shard-{shard:04d}/meta_caption_{MODEL}.csv"
            self.s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue().encode("utf-8"))
            self.results.append({"output": f"s3://{bucket}/{key}", "rows": per_shard})

    def snapshot(self) -> list[tuple]:
        """Every row's caption columns, on a fresh connection (committed state only)."""
        conn = self.pg.connect(self.dbname)
        try:
            with metadb.transaction(conn) as cur:
                cur.execute("SELECT path, text, caption_status, caption_error, caption_model, captioned_at "
                            "FROM video_meta WHERE partition_key = %s ORDER BY path", (KEY,))
                return cur.fetchall()
        finally:
            conn.close()

    def counts(self) -> dict[str, int]:
        conn = self.pg.connect(self.dbname)
        try:
            with metadb.transaction(conn) as cur:
                cur.execute("SELECT count(*), count(DISTINCT path), count(text), "
                            "count(*) FILTER (WHERE caption_model = %s) FROM video_meta WHERE partition_key = %s",
                            (MODEL, KEY))
                total, distinct, with_text, this_model = cur.fetchone()
        finally:
            conn.close()
        return {"rows": total, "distinct_paths": distinct, "with_caption": with_text, "by_this_model": this_model}

    def expected(self) -> dict[str, tuple]:
        return {self.paths[i]: (*_caption(i), MODEL) for i in range(ROWS)}

    def manifest(self) -> list[dict]:
        body = self.s3.get_object(Bucket=self.bucket, Key=f"manifests/{KEY}/train_manifest.csv")["Body"].read()
        return list(csv.DictReader(io.StringIO(body.decode("utf-8"))))


@pytest.fixture
def world(pg_server, s3_server, s3_bucket) -> World:
    return World(pg_server, s3_server, s3_bucket)


def _write_back_in_thread(world: World, conn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target() -> None:
        try:
            box["written"] = steps.write_back(world.s3, conn, KEY, world.results, MODEL)
        except BaseException as err:  # handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=target, name="write-back", daemon=True)
    thread.start()
    return thread, box


def _wait_until_blocked_mid_transaction(world: World, writer_pid: int, blocker_pid: int, box: dict) -> dict:
    """Poll pg_stat_activity until the writer is inside its upsert, has written rows, and waits on our lock."""
    watcher = world.pg.connect(world.dbname)
    watcher.autocommit = True
    try:
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            with watcher.cursor() as cur:
                cur.execute("SELECT state, backend_xid::text, pg_blocking_pids(pid), "
                            "position('INSERT INTO video_meta' in query) > 0, pg_postmaster_start_time() "
                            "FROM pg_stat_activity WHERE pid = %s", (writer_pid,))
                row = cur.fetchone()
            if row is not None:
                state, xid, blocking, in_upsert, started = row
                if state == "active" and xid is not None and blocking == [blocker_pid] and in_upsert:
                    return {"xid": xid, "postmaster_started": started}
            if box:
                pytest.fail(f"the write-back ended before the restart could hit its transaction: {box}")
            if time.monotonic() > deadline:
                pytest.fail(f"the write-back never blocked on the locked row; last pg_stat_activity: {row}")
            time.sleep(0.02)
    finally:
        watcher.close()


def _train_try(world: World, connect) -> tuple[int, dict]:
    """What the `train` task does on a fresh connection: write back, then the manifest."""
    conn = connect(world.dsn)
    try:
        written = steps.write_back(world.s3, conn, KEY, world.results, MODEL)
        return written, steps.write_manifest(world.s3, conn, KEY, world.bucket, "manifests")
    finally:
        conn.close()


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_postgres_restart_mid_write_back_rolls_back_and_the_retry_completes(world, pg_server, driver):
    connect, backend_pid, operational_error = DRIVERS[driver]
    before = world.snapshot()
    assert world.counts() == {"rows": ROWS, "distinct_paths": ROWS, "with_caption": ROWS // 10,
                              "by_this_model": 0}

    # A second session locks the row in the middle of the write-back's order and keeps its transaction open.
    blocker = pg_server.connect(world.dbname)
    writer = connect(world.dsn)
    try:
        with blocker.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            blocker_pid = cur.fetchone()[0]
            cur.execute("SELECT 1 FROM video_meta WHERE partition_key = %s AND path = %s FOR UPDATE",
                        (KEY, world.paths[LOCKED_ROW]))
            assert cur.rowcount == 1
        writer_pid = backend_pid(writer)
        started = time.monotonic()
        thread, box = _write_back_in_thread(world, writer)
        seen = _wait_until_blocked_mid_transaction(world, writer_pid, blocker_pid, box)
        blocked = time.monotonic()
        old_postmaster = pg_server.pid
        pg_server.restart()  # fast shutdown: the server ends every session, then starts on the same port
        thread.join(WAIT_LIMIT)
        log.info("%s: write-back blocked mid-transaction (xid %s) after %.2f s; restart took %.2f s; error: %r",
                 driver, seen["xid"], blocked - started, time.monotonic() - blocked, box.get("error"))
        assert not thread.is_alive(), "the write-back still hangs after the restart"
    finally:
        writer.close()
        blocker.close()

    # The attempt failed with the driver's connection error, not something that hides the cause.
    assert "written" not in box, f"the write-back committed {box.get('written')} rows despite the restart"
    err = box["error"]
    assert isinstance(err, operational_error), repr(err)
    assert any(s in str(err) for s in ("terminating connection", "server closed the connection",
                                       "consuming input failed")), repr(err)
    # The restart really happened: a new postmaster, started after the write-back's transaction began.
    assert pg_server.pid not in (None, old_postmaster)
    check = pg_server.connect(world.dbname)
    try:
        with metadb.transaction(check) as cur:
            cur.execute("SELECT pg_postmaster_start_time() > %s, pg_xact_status(%s::xid8)",
                        (seen["postmaster_started"], seen["xid"]))
            restarted, xact_status = cur.fetchone()
    finally:
        check.close()
    assert restarted
    assert xact_status == "aborted"  # the write-back's own transaction, by its id

    # Nothing of that attempt is visible: every row exactly as before, old captions included.
    assert world.snapshot() == before
    assert world.counts() == {"rows": ROWS, "distinct_paths": ROWS, "with_caption": ROWS // 10,
                              "by_this_model": 0}

    # The retry, on a fresh connection as the next Airflow try gets, completes.
    written, manifest = _train_try(world, connect)
    assert written == ROWS
    after = world.snapshot()
    assert world.counts() == {"rows": ROWS, "distinct_paths": ROWS, "with_caption": ROWS, "by_this_model": ROWS}
    assert {path: (text, status, error, model) for path, text, status, error, model, _ in after} == world.expected()
    assert all(captioned_at is not None for *_, captioned_at in after)
    ok = [i for i in range(ROWS) if _caption(i)[1] == "ok"]
    assert manifest["rows"] == len(ok) and manifest["changed"]
    assert [(r["path"], r["text"]) for r in world.manifest()] == [(world.paths[i], _caption(i)[0]) for i in ok]

    # A second retry changes nothing: same rows, same captioned_at, manifest bytes untouched.
    written, manifest_again = _train_try(world, connect)
    assert written == ROWS
    assert world.snapshot() == after
    assert not manifest_again["changed"] and manifest_again["rows"] == len(ok)


def test_restart_between_write_back_and_manifest_then_the_task_retry_completes(world, pg_server):
    """The `train` task writes back, then the manifest; a restart in between fails the try, the retry redoes both."""
    conn = psycopg.connect(world.dsn)
    try:
        assert steps.write_back(world.s3, conn, KEY, world.results, MODEL) == ROWS
        committed = world.snapshot()
        pg_server.restart()
        with pytest.raises(psycopg.OperationalError):
            steps.write_manifest(world.s3, conn, KEY, world.bucket, "manifests")
    finally:
        conn.close()
    assert world.snapshot() == committed  # the committed write-back survived the restart
    assert "Contents" not in world.s3.list_objects_v2(Bucket=world.bucket, Prefix="manifests/")

    written, manifest = _train_try(world, psycopg.connect)
    assert written == ROWS
    assert world.snapshot() == committed  # upserting the same captions again changes nothing, captioned_at included
    ok = [i for i in range(ROWS) if _caption(i)[1] == "ok"]
    assert manifest["rows"] == len(ok) and manifest["changed"]
    assert [r["path"] for r in world.manifest()] == [world.paths[i] for i in ok]
