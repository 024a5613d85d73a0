"""The publish fence: a rank writes the partition's output only while its attempt still holds the lease.

The operator holds a lease on the partition (``operators.lease``) and stops msrun when it loses it, but that
takes up to one renewal period, and a rank that finished its last row in that window would publish anyway:
after a recaption with new settings, a stale attempt could overwrite the new output with old captions.
So the operator tells its ranks which lease is theirs (``CAPTION_LEASE``: the lease's URI, the holder's token
and the ttl), and ``publish`` calls :meth:`LeaseFence.check` before the summary and again before the output.

The check passes only when the lease object still carries our token and has at least a quarter of its ttl
left, which a holder that renews every quarter ttl always has. Contenders that follow the protocol take a
lease over only after it expires, so the write that follows the check happens while nobody else may hold the
partition; that write may retry only within the time the check found left (``storage.retry_budget``). A lease
near expiry (renewals failing) is re-read until it is renewed or ``wait`` runs out.

Time left is judged by S3's clock, never a host's: the lease object's age is the response's ``Date`` minus its
``Last-Modified`` (both stamped by the S3 server), and it expires ``ttl`` seconds after it was last written
(:func:`lease_age`). A host whose clock runs a minute ahead can neither take a live lease nor publish on a dead
one. (Bodies without ``ttl``, written by older versions, are judged by their ``expires_at`` as before.)
Ranks started without ``CAPTION_LEASE`` (the CLI on its own, nodes other than node 0) are not fenced.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from captioning_core import storage

log = logging.getLogger(__name__)

LEASE_ENV = "CAPTION_LEASE"


class LeaseLostError(RuntimeError):
    """This attempt no longer holds the partition lease: it must not publish."""


def lease_age(response: dict) -> float | None:
    """Seconds since the object in a GetObject ``response`` was last written, by the S3 server's clock
    (``Date`` minus ``Last-Modified``, both whole seconds); None when the server sent no ``Date``."""
    date = (response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("date")
    modified = response.get("LastModified")
    if not date or modified is None:
        return None
    return max(0.0, (parsedate_to_datetime(date) - modified).total_seconds())


_S3_CLOCK_STEP = 1.0  # Date and Last-Modified are whole seconds: a measured age is off by up to this much


def seconds_left(body: dict, age: float | None) -> float:
    """At least how long the lease whose object is ``body`` (read ``age`` seconds after it was written) still
    runs: by S3's clock when the body states its ``ttl``, else (older bodies) by ``expires_at`` and this host's."""
    if "ttl" in body and age is not None:
        return float(body["ttl"]) - age - _S3_CLOCK_STEP
    return float(body.get("expires_at", 0)) - time.time()


def has_expired(body: dict, age: float | None) -> bool:
    """The lease has certainly run out (what a contender needs before it takes the lease over)."""
    if "ttl" in body and age is not None:
        return age - _S3_CLOCK_STEP > float(body["ttl"])
    return float(body.get("expires_at", 0)) < time.time()


def read_lease(uri: str) -> tuple[dict, float | None, str]:
    """The lease object at ``uri``: its body, its age by S3's clock and its ETag (raises what S3 raises)."""
    bucket, key = storage.split(uri)
    response = storage.s3_client().get_object(Bucket=bucket, Key=key)
    raw = response["Body"].read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {"token": "?"}
    return (body if isinstance(body, dict) else {"token": "?"}), lease_age(response), response["ETag"]


@dataclass(frozen=True)
class LeaseFence:
    uri: str
    token: str
    ttl: float
    wait: float = 30.0
    poll: float = 1.0

    @classmethod
    def from_env(cls) -> LeaseFence | None:
        raw = os.environ.get(LEASE_ENV)
        if not raw:
            return None
        try:
            spec = json.loads(raw)
            return cls(str(spec["uri"]), str(spec["token"]), float(spec["ttl"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{LEASE_ENV} must be JSON with uri, token and ttl; got {raw!r:.200}") from err

    def env(self) -> dict[str, str]:
        return {LEASE_ENV: json.dumps({"uri": self.uri, "token": self.token, "ttl": self.ttl})}

    def check(self) -> float:
        """Return the seconds the lease still runs while it is ours with a quarter of its ttl left; raise
        :class:`LeaseLostError` if not. The caller's write must finish within what is returned."""
        deadline = time.monotonic() + self.wait
        margin = self.ttl / 4
        while True:
            started = time.monotonic()
            try:
                body, age, _ = read_lease(self.uri)
            except Exception as err:  # gone, unreadable, S3 down: not provably ours
                problem = f"cannot read it ({type(err).__name__}: {err})"
            else:
                if body.get("token") != self.token:
                    raise LeaseLostError(f"the partition lease {self.uri} is now held by {body.get('token')}; "
                                         "not publishing")
                left = seconds_left(body, age) - (time.monotonic() - started)
                if left >= margin:
                    return left
                problem = f"it expires in {left:.1f}s (needs {margin:.1f}s)"
            if time.monotonic() >= deadline:
                raise LeaseLostError(f"the partition lease {self.uri} is not provably ours: {problem}; not publishing")
            log.warning("publish fence: waiting for the lease %s to be renewed: %s", self.uri, problem)
            time.sleep(self.poll)
