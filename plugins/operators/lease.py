"""A lease object in S3 so that two attempts never caption the same partition at once.

Acquire = conditional create (``If-None-Match: *``). A holder renews it on a heartbeat thread with
``If-Match`` on the ETag it wrote. An expired lease (its holder died without releasing) is taken over with
``If-Match`` on the ETag read, so of two contenders exactly one wins.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another live attempt holds the partition's lease."""


def _code(err: Exception) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


@dataclass
class S3Lease:
    client: object  # boto3 S3 client
    bucket: str
    key: str
    holder: str
    ttl: float = 300.0
    poll: float = 5.0

    def __post_init__(self) -> None:
        self.token = f"{self.holder}|{socket.gethostname()}|{uuid.uuid4().hex[:8]}"
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "expires_at": time.time() + self.ttl}).encode()

    def _read(self) -> tuple[dict, str] | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as err:
            if _code(err) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        try:
            return json.loads(obj["Body"].read()), obj["ETag"]
        except ValueError:
            return {"token": "?", "expires_at": 0}, obj["ETag"]

    def _put(self, **condition) -> bool:
        try:
            self._etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                **condition)["ETag"]
            return True
        except Exception as err:
            if _code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    def try_acquire(self) -> bool:
        if self._put(IfNoneMatch="*"):
            return True
        current = self._read()
        if current is None:
            return self._put(IfNoneMatch="*")
        body, etag = current
        if float(body.get("expires_at", 0)) < time.time():
            log.warning("taking over expired lease s3://%s/%s from %s", self.bucket, self.key, body.get("token"))
            return self._put(IfMatch=etag)
        return False

    def acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while not self.try_acquire():
            current = self._read()
            holder = current[0].get("token") if current else "?"
            if time.monotonic() >= deadline:
                raise LeaseHeldError(f"partition lease s3://{self.bucket}/{self.key} is held by {holder}")
            log.info("partition is leased by %s; waiting", holder)
            time.sleep(self.poll)
        log.info("acquired lease s3://%s/%s", self.bucket, self.key)
        self._thread = threading.Thread(target=self._renew_loop, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._put(IfMatch=self._etag):
                    self.lost = True
                    log.error("lost the partition lease s3://%s/%s", self.bucket, self.key)
                    return
            except Exception as err:  # transient S3 trouble: keep trying until the lease expires
                log.warning("lease renewal failed: %s", err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self._read()
        if current is not None and current[0].get("token") == self.token:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
