"""MsrunHook: builds the msrun argv, owns the process tree, streams rank logs, and stops everything it started.

Process layout (every way a task can die leaves no worker behind):
- msrun stays in the task's process group, so the task supervisor's group SIGKILL reaches it;
- msrun starts with SIGTERM ignored (an ignored disposition survives exec): msrun has no SIGTERM handler and
  would die at once, and its death SIGKILLs every rank (next point) before they can stop cleanly. So the
  supervisor's group SIGTERM leaves it alone, and the hook stops it once the ranks are done;
- msrun gets ``PR_SET_PDEATHSIG`` = SIGKILL, so it dies if the task process dies (even by SIGKILL);
- msrun starts each worker in a process group of its own; every rank sets ``PR_SET_PDEATHSIG`` itself
  (``captioning_core.signals.die_with_parent``), so workers die with msrun.

Stopping (``kill()``: on_kill, execution_timeout, a lost lease) only sends signals and returns; it runs in
the task runner's SIGTERM handler, in the main thread, while ``run()`` is blocked waiting on msrun, so it
must neither wait on msrun's Popen nor sleep. It SIGSTOPs msrun (otherwise msrun SIGKILLs every other rank
as soon as the first one exits non-zero), SIGTERMs every rank (each stops before its next batch, journals what is
done, and exits 143), SIGTERMs them again halfway through ``kill_grace`` (a rank then abandons the batch in
flight), and a watcher thread SIGKILLs msrun once the ranks are gone, or SIGKILLs the lot after
``kill_grace``. ``run()`` reaps msrun and raises ``MsrunError`` saying why it was stopped. A kill
that comes before the launch is remembered: ``run()`` then starts nothing, or stops msrun at once.

The ranks' environment is an allow-list (``rank_environment``): system and library paths, locale, Python
paths, the MindSpore/HCCL/Ascend variables, the stage's own ``CAPTION_*`` settings and what the caller
passes; never the worker's Airflow configuration (``AIRFLOW__*``: Fernet key, database URI, secrets).

With ``run_as`` (a user name) msrun and the ranks run as that unprivileged user, started in the msrun log
directory (owned by that user) with its own ``HOME``: the worker's ``/proc/<pid>/environ``, its working
directory and the Airflow home are then out of the ranks' reach, which an environment allow-list alone cannot
give (a process can read the environ of every process of its own uid). The worker must be allowed to switch
users (root, or CAP_SETUID and CAP_SETGID); signalling the ranks needs the same.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import pwd
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from airflow.sdk import BaseHook

from operators.rank_env import FAULTS_ENV, GATED

_PR_SET_PDEATHSIG = 1
#: what msrun (mindspore.parallel.cluster) logs once every process is spawned, right before its join loop
JOIN_STARTED = "Waiting all processes to exit"
# msrun hands log_dir to os.system() when a worker fails, so only plain path characters are allowed.
_SAFE_LOG_DIR = re.compile(r"^[A-Za-z0-9_./=+-]+$")
# A level as the ranks write it (``... rank0 WARNING captioning_core.runner: ...``) or as MindSpore's glog and
# msrun do (``[WARNING] ME(...)``), near the start of a line
_LINE_LEVEL = re.compile(r"(?:^|\s)\[?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\]?(?=[\s:])")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "CRITICAL": logging.CRITICAL}


def line_level(line: str, previous: int = logging.INFO) -> int:
    """The logging level a rank or msrun line was written at: its own level word; a traceback or an indented
    continuation keeps the ``previous`` line's level; anything else is INFO."""
    found = _LINE_LEVEL.search(line[:160])
    if found:
        return _LEVELS[found.group(1)]
    if line.startswith((" ", "\t", "Traceback")) or re.match(r"^\w+(\.\w+)*(Error|Exception): ", line):
        return previous
    return logging.INFO
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
    idle_join: bool = True  # once the workers are spawned, msrun's join loop runs under SCHED_IDLE (see below)

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


#: environment variables a rank may inherit from the worker, by exact name ...
RANK_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "TMP", "TEMP", "TZ", "LANG", "LANGUAGE", "HOSTNAME",
    "LD_LIBRARY_PATH", "LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "PYTHONHASHSEED", "PYTHONIOENCODING", "VIRTUAL_ENV", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
    "TOOLCHAIN_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "AWS_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
})
#: ... and by prefix: locale, MindSpore, HCCL/Ascend/CANN, glog, the stage's own settings, Airflow's task
#: context (AIRFLOW_CTX_*: dag/task/run ids and try number, no secret; the fault drills key on the try)
RANK_ENV_PREFIXES = ("LC_", "MS_", "MINDSPORE_", "HCCL_", "ASCEND_", "ACL_", "CANN_", "GLOG_", "RANK_",
                     "DEVICE_", "CAPTION_", "AIRFLOW_CTX_")


def rank_environment(base: dict[str, str], extra: dict[str, str], *, allow_fault_injection: bool = False
                     ) -> dict[str, str]:
    """What the ranks may see: the allow-listed part of ``base`` (the worker's environment) plus ``extra``
    (what the operator passes: S3 settings from its connection, the DAG's ``env``). The worker's own copies
    of the gated ``CAPTION_*`` names (rank_env.GATED) never pass: only the caller sets those; and
    ``CAPTION_FAULTS``, from either, only when fault injection is explicitly allowed (drills)."""
    env = {k: v for k, v in base.items()
           if (k in RANK_ENV_NAMES or k.startswith(RANK_ENV_PREFIXES)) and (k == FAULTS_ENV or k not in GATED)}
    env.update(extra)
    if not allow_fault_injection:
        env.pop(FAULTS_ENV, None)
    return env


def _prepare_child() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # see the module docstring; ranks install their own handler


class MsrunObserver(Protocol):
    """What a caller may attach to watch msrun (``MsrunHook(..., observer=...)``), e.g. the CPU sampling of
    ``operators.msrun_cpu.CpuSampler``; the hook itself measures nothing. Both calls get msrun's pid."""

    def polled(self, pid: int) -> None:
        """Once a second while ``run()`` waits for msrun (in ``run()``'s thread)."""

    def join_started(self, pid: int) -> None:
        """When msrun logs that every process is spawned (its join loop starts), before the idle join (in the
        thread that reads msrun's output)."""


@dataclass(frozen=True)
class RankUser:
    """The unprivileged account msrun and the ranks run as (``MsrunHook(run_as=...)``)."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str) -> RankUser:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise MsrunError(f"the rank user {name!r} does not exist on this host (scripts/setup.sh and the "
                             f"compose image create 'caption-rank')") from None
        if entry.pw_uid == 0:
            raise MsrunError(f"the rank user {name!r} is root: the ranks would keep every privilege")
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def popen_kwargs(self, cwd: str) -> dict:
        """What makes a child this user: its ids (no supplementary groups of the worker's) and a cwd of its own."""
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "cwd": cwd}

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        return {**env, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}


class MsrunHook(BaseHook):
    """Runs one msrun job; ``run`` blocks until it ends and raises MsrunError on failure or when stopped."""

    def __init__(self, spec: MsrunSpec, env: dict[str, str] | None = None, *, python: str | None = None,
                 kill_grace: float = 4.0, tail_lines: int = 40, allow_fault_injection: bool = False,
                 line_sink: Callable[[str], None] | None = None, observer: MsrunObserver | None = None,
                 run_as: str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.run_as = run_as
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.kill_grace = kill_grace
        self.tail_lines = tail_lines
        self.allow_fault_injection = allow_fault_injection
        self.line_sink = line_sink
        self.observer = observer
        self.proc: subprocess.Popen | None = None
        self._tails: dict[str, collections.deque] = {}
        self._levels: dict[str, int] = {}  # per source: the last line's level (continuations keep it)
        self._offsets: dict[int, int] = {}
        self._stop = threading.Event()
        self.stop_reason: str | None = None  # set by kill(); run() raises with it
        self._stopping = False
        self._tree: dict[int, object] = {}  # pid -> psutil.Process of everything msrun started
        self.join_policy = "default"  # msrun's scheduling once its workers are up (see _idle_join)

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
        env = rank_environment(dict(os.environ), self.env, allow_fault_injection=self.allow_fault_injection)
        # msrun launches workers as plain `python`: make that this interpreter.
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", "")])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    # -- running ----------------------------------------------------------------------------------------
    def run(self) -> int:
        argv = self.build_argv()
        if self.stop_reason:
            raise MsrunError(f"msrun was not started: {self.stop_reason}")
        Path(self.spec.log_dir).mkdir(parents=True, exist_ok=True)
        user = RankUser.lookup(self.run_as) if self.run_as else None
        env = self.build_env()
        extra: dict = {}
        if user is not None:
            os.chown(self.spec.log_dir, user.uid, user.gid)  # msrun writes its logs there, as that user
            env, extra = user.environment(env), user.popen_kwargs(self.spec.log_dir)
        # A reused log_dir keeps older runs' lines (msrun appends): tail only what this run writes.
        self._offsets = {rank: self._rank_log(rank).stat().st_size if self._rank_log(rank).exists() else 0
                         for rank in range(self.spec.local_worker_num)}
        self.log.info("msrun argv: %s", argv)
        try:
            self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_prepare_child, text=True,
                                         errors="replace", **extra)
        except PermissionError as err:
            raise MsrunError(f"cannot start msrun as {self.run_as!r}: {err} (the worker must be root or hold "
                             f"CAP_SETUID and CAP_SETGID)") from err
        if self.stop_reason:  # killed while Popen ran: kill() saw no process yet
            self._begin_stop()
        readers = [threading.Thread(target=self._pump_stdout, daemon=True, name="msrun-stdout")]
        readers += [threading.Thread(target=self._tail_rank, args=(rank,), daemon=True, name=f"rank{rank}-log")
                    for rank in range(self.spec.local_worker_num)]
        for t in readers:
            t.start()
        try:
            code = self._wait()
        except BaseException as err:  # execution_timeout (AirflowTaskTimeout) or another interruption
            if not self.stop_reason:
                self.stop_reason = f"the task was interrupted ({type(err).__name__})"
            self._begin_stop()
            self._reap()
            raise
        finally:
            time.sleep(0.3)  # let the tailers read the last lines
            self._stop.set()
            for t in readers:
                t.join(timeout=5)
            self._kill_leftovers()  # nothing msrun started may outlive the task
        if self.stop_reason:
            raise MsrunError(f"msrun was stopped: {self.stop_reason}\n{self.failure_report()}")
        if code != 0:
            raise MsrunError(f"msrun exited with code {code}\n{self.failure_report()}")
        return code

    def _wait(self) -> int:
        """Wait for msrun, noting every process it starts (so none can be left behind)."""
        assert self.proc is not None
        while True:
            self._note_tree()
            if self.observer is not None:
                self.observer.polled(self.proc.pid)
            try:
                return self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue

    def _reap(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.kill_grace + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.proc.poll() is None:
            with _quiet():
                self.proc.kill()
            self.proc.wait()

    def _emit(self, source: str, line: str) -> None:
        """One line of msrun or a rank into the task log, at the level it was written at (a failed row's
        WARNING stays a warning, so filtering the log by level finds it)."""
        line = line.rstrip("\n")
        self._tails.setdefault(source, collections.deque(maxlen=self.tail_lines)).append(line)
        level = self._levels[source] = line_level(line, self._levels.get(source, logging.INFO))
        if self.line_sink is not None:
            self.line_sink(f"[{source}] {line}")
        else:
            self.log.log(level, "[%s] %s", source, line)

    def _pump_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if JOIN_STARTED in line:
                self._join_started()
            self._emit("msrun", line)

    def _join_started(self) -> None:
        """msrun's join loop starts: tell the observer, then (``idle_join``) lower msrun's priority."""
        assert self.proc is not None
        if self.observer is not None:
            self.observer.join_started(self.proc.pid)
        if self.spec.idle_join:
            self._idle_join()

    def _idle_join(self) -> None:
        """msrun's join loop polls its workers without sleeping (a core's worth of spinning, which the ranks
        lose on a small host). Once msrun says every process is spawned, the hook moves msrun, and only msrun,
        to SCHED_IDLE: it then runs only on CPU time nobody else wants, and still sees a worker exit (and
        stops the others) as before. Workers spawned earlier keep their policy; msrun is not changed
        otherwise (nice 19 if SCHED_IDLE is refused)."""
        assert self.proc is not None
        try:
            os.sched_setscheduler(self.proc.pid, os.SCHED_IDLE, os.sched_param(0))
            self.join_policy = "SCHED_IDLE"
        except OSError as err:
            try:
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)
                self.join_policy = "nice 19"
            except OSError:
                self.log.warning("could not lower msrun's join-loop priority: %s", err)
                return
        self.log.info("msrun's workers are up; its join loop now runs at %s", self.join_policy)

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

    # -- stopping ---------------------------------------------------------------------------------------
    def descendants(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _note_tree(self) -> list:
        """psutil handles of msrun's live descendants, remembered in ``_tree`` (they keep their start time,
        so a reused PID is never signalled)."""
        import psutil

        found = []
        if self.proc is None:
            return found
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._tree.setdefault(child.pid, child)
                found.append(self._tree[child.pid])
        except psutil.Error:
            pass
        return found

    def kill(self, reason: str = "the task was killed") -> None:
        """Stop the job from outside; only sends signals and returns (safe in a signal handler).

        ``run()`` then raises ``MsrunError`` naming ``reason`` even if msrun exits 0. Before the launch it
        only records the reason, and ``run()`` starts nothing.
        """
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.proc is not None:
            self._begin_stop()

    def _begin_stop(self) -> None:
        if self._stopping or self.proc is None:
            return
        self._stopping = True
        if self.proc.poll() is not None:
            return
        ranks = self._note_tree()
        with _quiet():
            os.kill(self.proc.pid, signal.SIGSTOP)  # msrun must not SIGKILL the ranks that exit first
        for p in ranks:
            with _quiet():
                p.send_signal(signal.SIGTERM)
        threading.Thread(target=self._escalate, args=(ranks, time.monotonic() + self.kill_grace),
                         name="msrun-stop", daemon=True).start()

    def _escalate(self, ranks: list, deadline: float) -> None:
        """Once every rank has exited (or at the deadline, SIGKILLing what is left), SIGKILL msrun."""
        import psutil

        # Said at once, from this thread (not the signal handler): when Airflow's supervisor stops the task it
        # SIGKILLs the task 5 s after its SIGTERM, which may come before run() can raise with this reason.
        self.log.error("msrun was stopped: %s; SIGTERM sent to %d ranks, SIGKILL after %gs", self.stop_reason,
                       len(ranks), self.kill_grace)

        def alive(p) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        again = time.monotonic() + self.kill_grace / 2
        while time.monotonic() < deadline and any(alive(p) for p in ranks):
            if again is not None and time.monotonic() >= again:
                again = None
                for p in ranks:  # second SIGTERM: abandon the batch in flight
                    if alive(p):
                        with _quiet():
                            p.send_signal(signal.SIGTERM)
            time.sleep(0.1)
        left = [p for p in ranks if alive(p)]
        if left:
            self.log.warning("%d msrun processes still running %.0fs after SIGTERM: SIGKILL", len(left),
                             self.kill_grace)
        for p in left:
            with _quiet():
                p.kill()
        if self.proc is not None and self.proc.poll() is None:
            with _quiet():
                os.kill(self.proc.pid, signal.SIGKILL)
            with _quiet():
                os.kill(self.proc.pid, signal.SIGCONT)

    def _kill_leftovers(self) -> None:
        """After msrun is gone: SIGKILL anything it started that is still running (orphans)."""
        import psutil

        left = []
        for p in self._tree.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.Error:
                continue
        if left:
            self.log.warning("killing %d processes msrun left behind", len(left))
        for p in left:
            with _quiet():
                p.kill()
        psutil.wait_procs(left, timeout=5)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        import psutil

        return exc_type is not None and issubclass(exc_type, psutil.Error | ProcessLookupError)
