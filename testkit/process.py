"""Stopping a child server we started: signal its process group by PID, escalate, reap."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def group_alive(pgid: int) -> bool:
    """True if any process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _signal_pid(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _wait_group(proc: subprocess.Popen[bytes], pgid: int, timeout: float) -> bool:
    """Reap ``proc`` and wait until its group is empty; True if that happened within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()
        if proc.returncode is not None and not group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_process_group(
    proc: subprocess.Popen[bytes],
    name: str,
    steps: Sequence[tuple[signal.Signals, float]] = ((signal.SIGTERM, 10.0), (signal.SIGTERM, 5.0)),
    kill_timeout: float = 5.0,
    leader_only: bool = False,
) -> int | None:
    """Signal the group led by ``proc`` (started with ``start_new_session``) step by step, then SIGKILL.

    With ``leader_only`` the steps go to ``proc`` alone (it shuts its children down itself); the final
    SIGKILL always goes to the whole group. Returns the exit code; safe when the process already exited.
    """
    pgid = proc.pid
    for sig, timeout in steps:
        if proc.poll() is not None and not group_alive(pgid):
            break
        log.info("stopping %s (pid %d) with %s", name, proc.pid, sig.name)
        if leader_only:
            _signal_pid(proc, sig)
        else:
            _signal_group(pgid, sig)
        if _wait_group(proc, pgid, timeout):
            break
    else:
        if proc.poll() is None or group_alive(pgid):
            log.warning("%s (pid %d) ignored %s; sending SIGKILL", name, proc.pid, [s.name for s, _ in steps])
            _signal_group(pgid, signal.SIGKILL)
            if not _wait_group(proc, pgid, kill_timeout):
                raise RuntimeError(f"{name} (pid {proc.pid}) survived SIGKILL")
    return proc.wait(timeout=kill_timeout)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children_of(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` as {child pid: start time}, the start time telling a reused PID apart."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found[int(entry.name)] = fields[19]
    return found


def kill_leftovers(snapshot: dict[int, str], name: str, timeout: float = 5.0) -> None:
    """Wait for the processes in ``snapshot`` (from :func:`children_of`) to exit, then SIGKILL survivors."""

    def alive() -> list[int]:
        out = []
        for pid, started in snapshot.items():
            fields = _stat_fields(pid)
            if fields is not None and fields[19] == started and fields[0] != "Z":
                out.append(pid)
        return out

    deadline = time.monotonic() + timeout
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        log.warning("%s child %d outlived its parent; sending SIGKILL", name, pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a log file (empty string if missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def alive(procs) -> list:
    """Those of ``procs`` (psutil processes) still running; a zombie or a vanished process counts as gone."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def caption_processes(root_pid: int | None = None) -> list:
    """msrun and caption-script processes under ``root_pid`` (default: this process), as psutil processes."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for p in children:
        try:
            if any("msrun" in part or "caption_qwen2vl.py" in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out
