"""A rank's graceful stop and its tie to msrun: signal handling only (no MindSpore here).

Graceful stop: when the task is killed (``on_kill``, ``execution_timeout``, the task marked failed), the
operator's hook sends SIGTERM to every rank, and SIGKILL only after a grace period. A rank's SIGTERM
handler only sets a flag (a handler runs between bytecodes of the main thread, which may be deep inside
MindSpore); the runner checks the flag before each batch and stops taking new ones, and its journal
writer's ``finally`` flushes what is done, so the next attempt resumes from there. A batch in flight may take
longer than the grace period (Airflow's supervisor SIGKILLs 5 s after its own SIGTERM), so a second SIGTERM
(the hook sends it halfway through its grace period) abandons that batch at once: the handler raises, and
the same ``finally`` blocks flush the batches already done. The rank then exits with
``EXIT_STOPPED`` (143, as a SIGTERM death would) so nothing mistakes a stopped rank for a finished one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (msrun) dies, so no rank outlives its launcher.

    msrun starts each worker in a process group of its own, out of reach of a group kill aimed at msrun;
    this closes that gap for every way msrun can die (including SIGKILL).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - non-glibc platforms
        log.warning("could not set PR_SET_PDEATHSIG; this rank may outlive msrun")


def started_by_msrun() -> bool:
    """msrun sets these for its workers (RANK_ID) and its scheduler process (MS_ROLE)."""
    return "RANK_ID" in os.environ or "MS_ROLE" in os.environ


def tie_to_parent(parent_at_start: int) -> None:
    """First thing in an msrun-started process: die with msrun from now on, and exit at once if msrun is
    already gone (it died while this interpreter started: we were reparented, and PDEATHSIG never fires)."""
    die_with_parent()
    parent = os.getppid()
    if parent != parent_at_start or parent == 1:
        sys.stderr.write(f"msrun (pid {parent_at_start}) is gone; this rank exits without doing anything\n")
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)


EXIT_STOPPED = 128 + signal.SIGTERM
_stop = {"requested": False, "raised": False}


class GracefulStop(SystemExit):
    """Raised between batches after SIGTERM; exits the rank with ``EXIT_STOPPED`` once ``finally`` blocks
    (the journal writer's close, the decode pool's shutdown) have run."""

    def __init__(self) -> None:
        super().__init__(EXIT_STOPPED)


def install_sigterm_handler() -> None:
    """On SIGTERM, ask the rank to stop before its next batch (see the module docstring)."""

    def _on_term(signum, frame) -> None:
        if not _stop["requested"]:
            _stop["requested"] = True
            log.warning("SIGTERM received: stopping after the batch in flight")
        elif not _stop["raised"]:  # a second SIGTERM: abandon the batch in flight (not once already exiting)
            _stop["raised"] = True
            log.warning("graceful SIGTERM stop: second SIGTERM, the batch in flight is abandoned; finished rows "
                        "are journaled, the rest is left for the next attempt (exit %d)", EXIT_STOPPED)
            raise GracefulStop()

    signal.signal(signal.SIGTERM, _on_term)


def raise_if_stopped() -> None:
    """Between batches: after SIGTERM, stop taking work (``GracefulStop``; the caller's ``finally`` flushes)."""
    if _stop["requested"] and not _stop["raised"]:
        _stop["raised"] = True
        log.warning("graceful SIGTERM stop: no new batch taken; finished rows are journaled, the rest is left "
                    "for the next attempt (exit %d)", EXIT_STOPPED)
        raise GracefulStop()
