"""The metadata table in PostgreSQL: apply the DDL, create a key's partition, run the named queries.

Queries live in ``sql/queries/*.sql`` with named parameters; values are always bound, never formatted in.

    python plugins/curation/metadb.py postgresql://user:pass@127.0.0.1:5432/db   # apply sql/schema.sql
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

TABLE = "video_meta"

log = logging.getLogger(__name__)


def sql_dir() -> Path:
    """``$CAPTION_SQL_DIR``, else the repository's ``sql/`` (plugins/curation/ -> repo root)."""
    env = os.environ.get("CAPTION_SQL_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "sql"


@functools.cache
def query(name: str) -> str:
    return (sql_dir() / "queries" / f"{name}.sql").read_text(encoding="utf-8")


@contextlib.contextmanager
def transaction(conn) -> Iterator:
    """A cursor inside one transaction, for psycopg2 and psycopg 3 connections alike.

    (PostgresHook hands out psycopg 3 connections when it is installed; ``with conn`` would close those.)
    If the server goes away mid-transaction, the server discards the transaction and the driver's own error
    (an ``OperationalError``) propagates. psycopg2's ``with conn`` would replace it with "connection already
    closed" from its rollback on the dead connection, hiding why the transaction failed.
    """
    if hasattr(conn, "transaction"):  # psycopg 3
        with conn.transaction(), conn.cursor() as cur:
            yield cur
        return
    cur = conn.cursor()
    try:
        yield cur
        conn.commit()
    except BaseException:
        try:
            conn.rollback()
        except Exception as err:  # connection lost: nothing to roll back on this side
            log.warning("rollback after a failed transaction failed too: %s", err)
        raise
    finally:
        cur.close()


def _sql_module(conn):
    if hasattr(conn, "transaction"):
        from psycopg import sql
    else:
        from psycopg2 import sql
    return sql


def apply_schema(conn) -> None:
    with transaction(conn) as cur:
        cur.execute((sql_dir() / "schema.sql").read_text(encoding="utf-8"))


def partition_table(key: str) -> str:
    return f"{TABLE}_p_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def ensure_partition(conn, key: str) -> None:
    """Create the LIST partition holding ``key`` if it is missing (names and values quoted by psycopg2)."""
    sql = _sql_module(conn)
    stmt = sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES IN ({})").format(
        sql.Identifier(partition_table(key)), sql.Identifier(TABLE), sql.Literal(key))
    with transaction(conn) as cur:
        cur.execute(stmt)


def run(conn, name: str, params: dict | None = None) -> list[tuple]:
    with transaction(conn) as cur:
        cur.execute(query(name), params or {})
        return cur.fetchall() if cur.description else []


def run_many(conn, name: str, rows: list[dict]) -> None:
    """One transaction for all rows: all are written or none (a retry then starts clean)."""
    if not rows:
        return
    with transaction(conn) as cur:
        cur.executemany(query(name), rows)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)  # noqa: T201 - CLI usage
        return 2
    import psycopg2

    conn = psycopg2.connect(argv[0])
    try:
        apply_schema(conn)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
