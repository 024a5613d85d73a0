"""MsrunHook: builds the msrun argv, owns the process tree, streams rank logs, and kills everything it started.

Process layout (every way a task can die leaves no worker behind):
- msrun stays in the task's process group, so the task supervisor's group SIGTERM/SIGKILL reaches it;
- msrun gets ``PR_SET_PDEATHSIG`` = SIGKILL, so it dies if the task process dies (even by SIGKILL);
- msrun starts each worker in a process group of its own; every rank sets ``PR_SET_PDEATHSIG`` itself
  (``captioning_core.runtime.die_with_parent``), so workers die with msrun;
- ``kill()`` (used by ``on_kill`` and timeouts) signals msrun and every descendant by PID: SIGTERM, a
  grace period, then SIGKILL.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from airflow.sdk import BaseHook

_PR_SET_PDEATHSIG = 1
# msrun hands log_dir to os.system() when a worker fails, so only plain path characters are allowed.
_SAFE_LOG_DIR = re.compile(r"^[A-Za-z0-9_./=+-]+$")
_SAFE_HOST = re.compile(r"^[A-Za-z0-9_.:-]+$")


class MsrunError(RuntimeError):
    """msrun exited with a non-zero code; the message carries the tail of each rank's log."""


@dataclass
class MsrunSpec:
    """What one msrun launch needs. Values are passed as argv items, never through a shell."""

    script: str
    script_args: list[str] = field(default_factory=list)
    log_dir: str = "msrun_log"
    worker_num: int = 2
    local_worker_num: int = 2
    master_addr: str = "127.0.0.1"
    master_port: int = 8118
    node_rank: int = -1
    join: bool = True
    cluster_time_out: int = 600

    def __post_init__(self) -> None:
        if self.worker_num < 1 or not (1 <= self.local_worker_num <= self.worker_num):
            raise ValueError(f"need 1 <= local_worker_num ({self.local_worker_num}) <= worker_num "
                             f"({self.worker_num})")
        if not _SAFE_LOG_DIR.match(str(self.log_dir)):
            raise ValueError(f"log_dir may only contain letters, digits and _./=+-: {self.log_dir!r}")
        if not _SAFE_HOST.match(self.master_addr):
            raise ValueError(f"bad master_addr {self.master_addr!r}")
        if not (1024 <= int(self.master_port) <= 65535):
            raise ValueError(f"master_port must be in 1024..65535, got {self.master_port}")
        if self.worker_num > self.local_worker_num and self.node_rank < 0:
            raise ValueError("multi-node runs (worker_num > local_worker_num) need node_rank >= 0")


def port_for(key: str, low: int = 20000, high: int = 60000) -> int:
    """A scheduler port derived from a task's identity, so concurrent tasks on one host don't collide."""
    import hashlib

    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    return low + digest % (high - low)


def pick_free_port(preferred: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """``preferred`` if it can be bound now, else the next port that can."""
    import socket

    for port in range(preferred, preferred + tries):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {preferred}..{preferred + tries}")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class MsrunHook(BaseHook):
    """Runs one msrun job; ``run`` blocks until it ends and raises MsrunError on failure."""

    def __init__(self, spec: MsrunSpec, env: dict[str, str] | None = None, *, python: str | None = None,
                 kill_grace: float = 10.0, tail_lines: int = 40,
                 line_sink: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.kill_grace = kill_grace
        self.tail_lines = tail_lines
        self.line_sink = line_sink
        self.proc: subprocess.Popen | None = None
        self._tails: dict[str, collections.deque] = {}
        self._offsets: dict[int, int] = {}
        self._killed = False
        self._stop = threading.Event()

    def build_argv(self) -> list[str]:
        s = self.spec
        msrun = str(Path(self.python).with_name("msrun"))
        argv = [msrun, f"--worker_num={s.worker_num}", f"--local_worker_num={s.local_worker_num}",
                f"--master_addr={s.master_addr}", f"--master_port={s.master_port}", f"--join={s.join}",
                f"--log_dir={s.log_dir}", f"--cluster_time_out={s.cluster_time_out}",
                # msrun would otherwise `tail -f` every worker log to its stdout without a rank prefix;
                # the hook tails the files itself and prefixes each line with its rank.
                f"--tail_worker_log={s.local_worker_num + 1}"]
        if s.node_rank >= 0:
            argv.append(f"--node_rank={s.node_rank}")
        return [*argv, s.script, *s.script_args]

    def build_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        # msrun launches workers as plain `python`: make that this interpreter.
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    # -- running ----------------------------------------------------------------------------------------
    def run(self) -> int:
        argv = self.build_argv()
        Path(self.spec.log_dir).mkdir(parents=True, exist_ok=True)
        # A reused log_dir keeps older runs' lines (msrun appends): tail only what this run writes.
        self._offsets = {rank: self._rank_log(rank).stat().st_size if self._rank_log(rank).exists() else 0
                         for rank in range(self.spec.local_worker_num)}
        self.log.info("msrun argv: %s", argv)
        self.proc = subprocess.Popen(argv, env=self.build_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent, text=True, errors="replace")
        readers = [threading.Thread(target=self._pump_stdout, daemon=True, name="msrun-stdout")]
        readers += [threading.Thread(target=self._tail_rank, args=(rank,), daemon=True, name=f"rank{rank}-log")
                    for rank in range(self.spec.local_worker_num)]
        for t in readers:
            t.start()
        try:
            code = self.proc.wait()
        finally:
            time.sleep(0.3)  # let the tailers read the last lines
            self._stop.set()
            for t in readers:
                t.join(timeout=5)
            self._stop_tree()  # a worker msrun failed to reap must not outlive the task
        if code != 0 or self._killed:
            why = "was killed" if self._killed else f"exited with code {code}"
            raise MsrunError(f"msrun {why}\n{self.failure_report()}")
        return code

    def _emit(self, source: str, line: str) -> None:
        line = line.rstrip("\n")
        self._tails.setdefault(source, collections.deque(maxlen=self.tail_lines)).append(line)
        if self.line_sink is not None:
            self.line_sink(f"[{source}] {line}")
        else:
            self.log.info("[%s] %s", source, line)

    def _pump_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._emit("msrun", line)

    def _rank_log(self, rank: int) -> Path:
        return Path(self.spec.log_dir) / f"worker_{rank}.log"

    def _tail_rank(self, rank: int) -> None:
        path = self._rank_log(rank)
        fh = None
        pending = ""
        while True:
            if fh is None and path.exists():
                fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
                fh.seek(self._offsets.get(rank, 0))
            chunk = fh.read() if fh is not None else ""
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    self._emit(f"rank {rank}", line)
            elif self._stop.is_set():
                break
            else:
                time.sleep(0.2)
        if pending:
            self._emit(f"rank {rank}", pending)
        if fh is not None:
            fh.close()

    def failure_report(self) -> str:
        parts = []
        for source, lines in sorted(self._tails.items()):
            parts.append(f"--- last {len(lines)} lines of {source} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- killing ----------------------------------------------------------------------------------------
    def descendants(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Stop the job from outside (``on_kill``, timeouts): ``run()`` then raises even if msrun exits 0."""
        self._killed = True
        self._stop_tree()

    def _stop_tree(self) -> None:
        """SIGTERM msrun and every descendant, wait ``kill_grace``, then SIGKILL what is left.

        msrun itself is waited for through its Popen only: reaping it any other way (psutil's wait) would
        leave ``run()``'s own wait with no exit status, which Python reports as 0, i.e. success.
        """
        if self.proc is None:
            return
        import psutil

        descendants = []
        for pid in self.descendants():
            try:
                descendants.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        if self.proc.poll() is None or descendants:
            self.log.info("stopping msrun and %d descendants", len(descendants))
        if self.proc.poll() is None:
            with _quiet():
                self.proc.terminate()
        for p in descendants:
            with _quiet():
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(descendants, timeout=self.kill_grace)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for p in alive:
            with _quiet():
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        with _quiet():
            self.proc.wait(timeout=5)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        import psutil

        return exc_type is not None and issubclass(exc_type, psutil.Error | ProcessLookupError)
