"""A real Redis (Debian's ``redis-server``) for the Celery broker: 127.0.0.1 only, a random password, stop by PID.

Configuration goes in a file (not argv) so the password never shows in ``ps``; no persistence, so a test's
queue never outlives the server.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from testkit.ports import LOOPBACK, free_port
from testkit.process import stop_process_group, tail

log = logging.getLogger(__name__)


def find_redis_server() -> str:
    path = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file()
                                            else None)
    if path is None:
        raise FileNotFoundError("redis-server not found: `make setup` installs Debian's redis-server")
    return path


class RedisServer:
    """``redis-server`` on 127.0.0.1 and a free port, with a generated password; health-checked by PING."""

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.binary = find_redis_server()
        self.port = free_port()
        self.password = secrets.token_urlsafe(24)
        self.start_timeout = start_timeout
        self.base_dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.log_path = self.base_dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def url(self, db: int = 0) -> str:
        """The broker URL (holds the password: pass it only through the environment)."""
        return f"redis://:{self.password}@{LOOPBACK}:{self.port}/{db}"

    def _write_config(self) -> Path:
        conf = self.base_dir / "redis.conf"
        conf.write_text("\n".join([
            f"bind {LOOPBACK}", f"port {self.port}", "protected-mode yes", f"requirepass {self.password}",
            f"dir {self.base_dir}", 'save ""', "appendonly no", "daemonize no", f"logfile {self.log_path}",
        ]) + "\n")
        conf.chmod(0o600)
        return conf

    def start(self) -> RedisServer:
        if self.pid is not None:
            return self
        conf = self._write_config()
        self._proc = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self._proc.returncode}): {tail(self.log_path)}")
            if self.ping():
                log.info("redis-server up on %s:%d (pid %d)", LOOPBACK, self.port, self._proc.pid)
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis-server not answering PING on port {self.port}: {tail(self.log_path)}")

    def command(self, *args: str) -> bytes:
        """One RESP command after AUTH; the raw reply line (enough for PING/DBSIZE/INFO checks)."""
        parts = [("AUTH", self.password), args]
        payload = b"".join(b"*%d\r\n" % len(p) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode())
                                                             for a in p) for p in parts)
        with socket.create_connection((LOOPBACK, self.port), timeout=2) as sock:
            sock.sendall(payload)
            data = b""
            while data.count(b"\r\n") < 2:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data.split(b"\r\n", 1)[1] if b"\r\n" in data else data

    def ping(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_group(self._proc, "redis-server", steps=((signal.SIGTERM, 10.0),))
            self._proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
