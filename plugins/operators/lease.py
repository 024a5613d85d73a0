"""A fenced lease object in S3, so that two attempts never caption the same partition at once.

- Acquire = conditional create (``If-None-Match: *``). The body names the holder: its task identity, host,
  boot id, pid and the pid's start time, and (once launched) msrun's pid and start time.
- The holder renews every ``ttl / 4`` with ``If-Match`` on the ETag it wrote last. A renewal that fails its
  condition means someone else holds the lease now: the lease is *lost*, ``on_lost`` runs (the operator stops
  msrun) and the attempt fails. A holder that cannot reach S3 until its own expiry also counts as lost,
  since a contender may take over from then on.
- The ranks are told the lease's token (``fence()``, passed as ``CAPTION_LEASE``) and check it right before
  they publish, so a rank that finishes in the moments between a theft and msrun's stop writes nothing.
- Release deletes with ``If-Match`` on our ETag, so a holder that lost the lease never deletes its successor's.
- Takeover, with ``If-Match`` on the ETag read, so of two contenders exactly one wins: when the lease has
  expired (``ttl``, about a minute), or at once when the holder ran on this very host (same boot id) and its
  process is gone (pid absent, or reused by a process that started at another time). That is what a retry
  after a SIGKILLed task sees. If that dead holder's msrun is somehow still alive (it should die with its
  parent), the contender kills it first, identified by pid and start time.

Why not Airflow 3.3's task_state_store / ResumableJobMixin to remember the launched msrun: a local pid only
means something on the host that started it, a retry may land elsewhere, and two attempts at one partition
may come from different DAG runs or deployments, which share no task-state row. The lease is per partition
and visible to every contender, so it carries the holder's process identity instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from captioning_core import storage
from captioning_core.lease_fence import LeaseFence, has_expired, lease_age

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another live attempt holds the partition's lease."""


class LeaseCancelled(RuntimeError):
    """The wait for the lease was cancelled (the task was killed)."""


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> float | None:
    """A process's start time (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_process_alive(pid: int | None, start: float | None) -> bool:
    """True when ``pid`` runs and is the process that started at ``start`` (not a reused pid)."""
    if not pid or start is None:
        return False
    now = process_start(int(pid))
    return now is not None and abs(now - float(start)) < 0.5


@dataclass
class S3Lease:
    client: object  # boto3 S3 client
    bucket: str
    key: str
    holder: str
    ttl: float = 60.0
    poll: float = 2.0
    on_lost: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self.token = f"{self.holder}|{socket.gethostname()}|{uuid.uuid4().hex[:8]}"
        self.renew_every = self.ttl / 4
        self._etag: str | None = None
        self._expires = 0.0
        self._seq = 0
        self._child: tuple[int, float] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost, once it was

    # -- the object ----------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        self._seq += 1
        self._expires = time.monotonic() + self.ttl
        # ``ttl`` decides expiry, by S3's clock (lease_fence.has_expired); ``expires_at`` is for people reading it
        body = {"token": self.token, "holder": self.holder, "host": socket.gethostname(), "boot_id": boot_id(),
                "pid": os.getpid(), "pid_start": process_start(os.getpid()), "ttl": self.ttl,
                "expires_at": time.time() + self.ttl, "seq": self._seq}
        if self._child:
            body["child_pid"], body["child_start"] = self._child
        return json.dumps(body).encode()

    def _read(self) -> tuple[dict, float | None, str] | None:
        """The lease object: body, age by S3's clock, ETag (None when there is none)."""
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as err:
            if storage.is_not_found(err):
                return None
            raise
        try:
            body = json.loads(obj["Body"].read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"token": "?", "expires_at": 0}  # unreadable: treated as expired
        return body, lease_age(obj), obj["ETag"]

    def _put(self, **condition) -> bool:
        try:
            self._etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                **condition)["ETag"]
            return True
        except Exception as err:
            if storage.is_precondition_failed(err):
                return False
            raise

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    # -- acquiring -----------------------------------------------------------------------------------------
    def _holder_is_gone(self, body: dict) -> bool:
        """The holder ran on this host (same boot) and its process no longer exists."""
        if body.get("host") != socket.gethostname() or not body.get("boot_id") or body["boot_id"] != boot_id():
            return False
        return not same_process_alive(body.get("pid"), body.get("pid_start"))

    def _stop_orphan(self, body: dict) -> None:
        """A dead holder's msrun still running on this host (it should have died with its parent): kill it."""
        pid, start = body.get("child_pid"), body.get("child_start")
        if not same_process_alive(pid, start):
            return
        import psutil

        log.warning("the dead holder's msrun (pid %s) is still running: killing it and its workers", pid)
        try:
            proc = psutil.Process(int(pid))
            tree = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            return
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
        psutil.wait_procs(tree, timeout=10)

    def try_acquire(self) -> bool:
        if self._put(IfNoneMatch="*"):
            return True
        current = self._read()
        if current is None:
            return self._put(IfNoneMatch="*")
        body, age, etag = current
        if has_expired(body, age):
            log.warning("taking over expired lease %s from %s", self.uri, body.get("token"))
            return self._put(IfMatch=etag)
        if self._holder_is_gone(body):
            log.warning("taking over lease %s: its holder %s (pid %s on this host) is gone", self.uri,
                        body.get("token"), body.get("pid"))
            self._stop_orphan(body)
            return self._put(IfMatch=etag)
        return False

    def acquire(self, wait: float, cancel: threading.Event | None = None) -> None:
        deadline = time.monotonic() + wait
        while not self.try_acquire():
            current = self._read()
            holder = current[0].get("token") if current else "?"
            if time.monotonic() >= deadline:
                raise LeaseHeldError(f"partition lease {self.uri} is held by {holder}")
            log.info("partition is leased by %s; waiting", holder)
            if cancel is not None and cancel.wait(self.poll):
                raise LeaseCancelled(f"stopped waiting for the partition lease {self.uri}: the task was killed")
            if cancel is None:
                time.sleep(self.poll)
        log.info("acquired lease %s (renewed every %.0fs, ttl %.0fs)", self.uri, self.renew_every, self.ttl)
        self._thread = threading.Thread(target=self._renew_loop, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def fence(self) -> LeaseFence:
        """What the ranks check before they publish (``captioning_core.lease_fence``)."""
        return LeaseFence(self.uri, self.token, self.ttl)

    def record_child(self, pid: int) -> None:
        """Note the launched msrun in the lease, so a same-host successor can tell if it outlived us."""
        self._child = (pid, process_start(pid) or 0.0)
        self.renew()

    # -- holding -------------------------------------------------------------------------------------------
    def renew(self) -> bool:
        """One conditional renewal; False (and ``on_lost``) when the lease is no longer ours."""
        with self._lock:
            if self.lost:
                return False
            try:
                if self._put(IfMatch=self._etag):
                    return True
                self._lose("another attempt took the lease over (conditional renewal failed)")
            except Exception as err:  # S3 trouble: keep trying until our own expiry
                if time.monotonic() < self._expires - 1:
                    log.warning("lease renewal failed, retrying: %s", err)
                    return True
                self._lose(f"could not renew the lease before it expired ({type(err).__name__}: {err})")
            return False

    def _lose(self, why: str) -> None:
        self.lost = f"lost the partition lease {self.uri}: {why}"
        log.error("%s", self.lost)
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            if not self.renew():
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.lost or self._etag is None:
                return
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
            except Exception as err:
                if storage.is_precondition_failed(err) or storage.is_not_found(err):
                    log.warning("lease %s was no longer ours at release; left in place", self.uri)
                    return
                raise
