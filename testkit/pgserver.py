"""A real PostgreSQL server for tests: initdb into a temp dir, 127.0.0.1 only, password auth, stop by PID."""

from __future__ import annotations

import glob
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from testkit.ports import LOOPBACK, free_port
from testkit.process import children_of, kill_leftovers, stop_process_group, tail

log = logging.getLogger(__name__)

DEFAULT_UNPRIVILEGED_USER = "nobody"


def find_pg_bin() -> Path:
    """Directory holding initdb and postgres: $TESTKIT_PG_BIN, PATH, or the newest /usr/lib/postgresql/*/bin."""
    env_dir = os.environ.get("TESTKIT_PG_BIN")
    if env_dir and (Path(env_dir) / "initdb").is_file():
        return Path(env_dir)
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).parent
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if (Path(d) / "initdb").is_file()]
    found.sort(key=lambda d: _version_key(d.parent.name), reverse=True)
    if found:
        return found[0]
    raise FileNotFoundError(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH, in $TESTKIT_PG_BIN or in "
        "/usr/lib/postgresql/*/bin; install them, e.g. `apt-get install postgresql`"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def _run_as() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as: None (ourselves) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("TESTKIT_PG_USER", DEFAULT_UNPRIVILEGED_USER)
    try:
        return pwd.getpwnam(name)
    except KeyError as err:
        raise RuntimeError(
            f"running as root and the unprivileged user {name!r} does not exist; PostgreSQL refuses to run "
            "as root: create the user or set TESTKIT_PG_USER"
        ) from err


class PostgresServer:
    """PostgreSQL on 127.0.0.1 and a free port, in a fresh cluster owned by an unprivileged user.

    Authentication is scram-sha-256 for a generated superuser and password, over TCP and the unix socket.
    """

    def __init__(self, start_timeout: float = 60.0) -> None:
        self.bin_dir = find_pg_bin()
        self.start_timeout = start_timeout
        self.user = "tk_" + secrets.token_hex(4)
        self.password = secrets.token_urlsafe(24)
        self.port = free_port()
        self.host = LOOPBACK
        self._account = _run_as()
        self.base_dir = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._initialised = False

    def __repr__(self) -> str:
        return f"PostgresServer(host={self.host!r}, port={self.port}, user={self.user!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """PID of the postmaster we started, or None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def dsn(self) -> str:
        """libpq key/value DSN of the ``postgres`` database."""
        return self.dsn_for("postgres")

    @property
    def uri(self) -> str:
        """``postgresql://`` URI of the ``postgres`` database."""
        return self.uri_for("postgres")

    def dsn_for(self, dbname: str) -> str:
        """libpq key/value DSN of ``dbname``."""
        return f"host={self.host} port={self.port} user={self.user} password={self.password} dbname={dbname}"

    def uri_for(self, dbname: str) -> str:
        """``postgresql://user:password@127.0.0.1:port/dbname``."""
        return f"postgresql://{quote(self.user)}:{quote(self.password, safe='')}@{self.host}:{self.port}/{dbname}"

    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"env": {**os.environ, "LC_ALL": "C", "LANG": "C"}}
        if self._account is not None:
            kwargs.update(user=self._account.pw_uid, group=self._account.pw_gid, extra_groups=[])
            kwargs["env"]["HOME"] = str(self.base_dir)
        return kwargs

    def _chown(self, path: Path) -> None:
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _initdb(self) -> None:
        """Create the cluster with a scram-sha-256 password for our superuser."""
        self._chown(self.base_dir)
        self.socket_dir.mkdir(mode=0o700)
        self._chown(self.socket_dir)
        pwfile = self.base_dir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password + "\n")
        self._chown(pwfile)
        argv = [
            str(self.bin_dir / "initdb"),
            f"--pgdata={self.data_dir}",
            f"--username={self.user}",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        log.info("initdb %s (user %s)", self.data_dir, self.user)
        try:
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, cwd=self.base_dir, **self._popen_kwargs()
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"initdb failed with code {result.returncode}:\n{output[-4000:]}")
        self._initialised = True

    def start(self) -> PostgresServer:
        """initdb on first start, then run postgres and wait until our user can log in over TCP."""
        if self.pid is not None:
            return self
        if not self._initialised:
            self._initdb()
        argv = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=50",
        ]
        log.info("starting postgres on %s:%d", self.host, self.port)
        with open(self.log_path, "ab") as log_fh:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                start_new_session=True,
                **self._popen_kwargs(),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("postgres ready (pid %d)", self._proc.pid)
        return self

    def _wait_ready(self) -> None:
        import psycopg2

        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with code {self._proc.returncode} during start-up; last lines of "
                    f"{self.log_path}:\n{tail(self.log_path)}"
                )
            try:
                psycopg2.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg2.OperationalError as err:
                last_error = err
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not accept logins within {self.start_timeout:.0f}s ({last_error}); "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            time.sleep(0.1)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Any:
        """A psycopg2 connection to ``dbname`` as our superuser."""
        import psycopg2

        return psycopg2.connect(self.dsn_for(dbname), **kwargs)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its DSN."""
        from psycopg2 import sql

        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        return self.dsn_for(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster, like pg_ctl -m fast), SIGQUIT, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # Postgres children call setsid(): they are not in the postmaster's group, so remember them by PID.
        children = children_of(proc.pid)
        steps = ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0))
        code = stop_process_group(proc, "postgres", steps=steps, leader_only=True)
        kill_leftovers(children, "postgres")
        log.info("postgres (pid %d) stopped, exit code %s", proc.pid, code)

    def restart(self) -> PostgresServer:
        """Stop, then start again on the same port and data dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and delete the cluster."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
