"""Fault injection for reliability drills, driven by ``CAPTION_FAULTS`` (off unless set).

Syntax: comma-separated ``kind@rank:arg``. Kinds:
- ``sigkill@R:N``   rank R SIGKILLs itself after it has journaled N rows in this attempt (the rank then
                    flushes its journal after every batch, so the kill lands exactly there).
- ``oom@R:r1+r2``   on rank R, any generate call that includes row r1 or r2 raises MemoryError.
- ``slow@R:S``      rank R sleeps S seconds after each batch, flushing its journal after every batch (to
                    widen race windows: a kill drill sees rows journaled while the rank is still busy).
- ``runtime@R``     every generate call on rank R raises RuntimeError (a device or model-runtime fault:
                    transient, so the rows are retried by the next attempt).
- ``crash_publish@R`` rank R SIGKILLs itself while publishing, after summary and gallery, before the output.
- ``bad_secret@R``  rank R replaces its S3 secret by a wrong one before any S3 call (a credentials drill
                    whose wrong secret can be limited to one Airflow try, which a connection cannot).

- ``decoder_crash@*:NAME`` / ``decoder_kill@*:NAME`` / ``decoder_hang@*:NAME``: the decoder process
                    (captioning_core.decode_sandbox) crashes natively (a real SIGSEGV: it reads address 0),
                    is SIGKILLed (as the OOM killer does) or hangs, when it decodes a file whose name
                    contains NAME. The decoder does not know its rank: these hit every rank.

- ``probe_reach@R`` rank R, first thing, tries to read what a rank must not (its ancestors'
                    ``/proc/<pid>/environ`` and working directories, and each path in ``CAPTION_PROBE_PATHS``,
                    ``os.pathsep``-separated) and logs one ``reach probe`` JSON line: path -> "read" or the error.

``R`` may be ``*``: every rank.

A fault may end in ``/tryN``: it then fires only in Airflow try N (``AIRFLOW_CTX_TRY_NUMBER``, which the
task exports to msrun and its ranks), e.g. ``sigkill@1:2/try1`` kills rank 1 in the first try only, so
the Airflow retry can show that it resumes.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass, field

ENV = "CAPTION_FAULTS"
DECODER_FAULTS = ("decoder_crash", "decoder_kill", "decoder_hang")


@dataclass
class FaultPlan:
    kill_after_rows: int | None = None
    oom_rows: set[int] = field(default_factory=set)
    sleep_per_batch: float = 0.0
    runtime_error: bool = False
    crash_before_output: bool = False
    bad_secret: bool = False
    probe_reach: bool = False

    @classmethod
    def from_env(cls, rank: int, env: dict[str, str] | None = None) -> FaultPlan:
        env = os.environ if env is None else env
        spec = env.get(ENV, "")
        plan = cls()
        for item in filter(None, (s.strip() for s in spec.split(","))):
            body, _, only_try = item.partition("/")
            kind, _, rest = body.partition("@")
            target, _, arg = rest.partition(":")
            if only_try and not re.fullmatch(r"try\d+", only_try):
                raise ValueError(f"{ENV}: bad try qualifier {only_try!r} in {item!r}")
            if only_try and only_try != f"try{env.get('AIRFLOW_CTX_TRY_NUMBER', '')}":
                continue
            if not target or (target != "*" and int(target) != rank):
                continue
            if kind == "sigkill":
                plan.kill_after_rows = int(arg)
            elif kind == "oom":
                plan.oom_rows = {int(r) for r in arg.split("+") if r}
            elif kind == "slow":
                plan.sleep_per_batch = float(arg)
            elif kind == "runtime":
                plan.runtime_error = True
            elif kind == "crash_publish":
                plan.crash_before_output = True
            elif kind == "bad_secret":
                plan.bad_secret = True
            elif kind == "probe_reach":
                plan.probe_reach = True
            elif kind in DECODER_FAULTS:
                pass  # acted on in the decoder process: decoder_fault
            else:
                raise ValueError(f"{ENV}: unknown fault kind {kind!r}")
        return plan

    @property
    def flushes_every_batch(self) -> bool:
        """Kill and slow-down drills need each batch journaled at once (an exact kill point, parts to see)."""
        return self.kill_after_rows is not None or self.sleep_per_batch > 0

    def before_generate(self, rows: list[int]) -> None:
        hit = self.oom_rows.intersection(rows)
        if hit:
            raise MemoryError(f"injected out-of-memory for rows {sorted(hit)}")
        if self.runtime_error:
            raise RuntimeError(f"injected model-runtime error for rows {rows}")

    def apply_to_environment(self) -> None:
        """Faults that act on the process before anything runs: called once, first thing, by the CLI."""
        if self.bad_secret:
            from captioning_core import storage

            os.environ["AWS_SECRET_ACCESS_KEY"] = "injected-wrong-secret"
            storage.s3_client.cache_clear()

    def report_reach(self) -> None:
        """The ``probe_reach`` drill: what this rank can read of what it must not, logged as one JSON line:
        its uid, each ancestor process (pid, uid, whether its environ and cwd could be read) and each path."""
        if not self.probe_reach:
            return
        import json
        import logging

        ancestors = []
        pid = os.getppid()
        while pid > 1:  # msrun, the task process, its supervisor, ...
            try:
                with open(f"/proc/{pid}/status", encoding="utf-8") as fh:  # readable by anyone
                    fields = dict(line.split(":", 1) for line in fh if ":" in line)
                uid, parent = int(fields["Uid"].split()[0]), int(fields["PPid"])
            except (OSError, KeyError, ValueError):
                break
            ancestors.append({"pid": pid, "uid": uid, "environ": _try_read(f"/proc/{pid}/environ"),
                              "cwd": _try_read(f"/proc/{pid}/cwd")})
            pid = parent
        paths = [p for p in os.environ.get("CAPTION_PROBE_PATHS", "").split(os.pathsep) if p]
        paths += ["/proc/self/environ", "/etc/hostname"]  # controls: readable by anyone
        report = {"uid": os.getuid(), "ancestors": ancestors, "paths": {p: _try_read(p) for p in paths}}
        logging.getLogger(__name__).warning("reach probe %s", json.dumps(report))

    def before_output(self) -> None:
        if self.crash_before_output:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_journal(self, rows_done: int) -> None:
        if self.sleep_per_batch:
            time.sleep(self.sleep_per_batch)
        if self.kill_after_rows is not None and rows_done >= self.kill_after_rows:
            os.kill(os.getpid(), signal.SIGKILL)


def decoder_fault(path: str, env: dict[str, str] | None = None) -> None:
    """In the decoder process, before decoding ``path``: act on a ``decoder_*`` fault naming it."""
    env = os.environ if env is None else env
    for item in filter(None, (s.strip() for s in env.get(ENV, "").split(","))):
        body, _, only_try = item.partition("/")
        kind, _, rest = body.partition("@")
        name = rest.partition(":")[2]
        if kind not in DECODER_FAULTS or not name or name not in os.path.basename(path):
            continue
        if only_try and only_try != f"try{env.get('AIRFLOW_CTX_TRY_NUMBER', '')}":
            continue
        if kind == "decoder_crash":
            import ctypes

            ctypes.string_at(0)  # a real native crash: SIGSEGV
        elif kind == "decoder_kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            while True:
                time.sleep(3600)


def _try_read(path: str) -> str:
    """``read`` if ``path`` (a file, or a directory: listed) can be read, else the error's name."""
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as fh:
                fh.read(1)
        return "read"
    except OSError as err:
        return type(err).__name__
