"""The publish fence: a rank writes the partition's output only while its attempt still holds the lease.

The operator holds a lease on the partition (``operators.lease``) and stops msrun when it loses it, but that
takes up to one renewal period, and a rank that finished its last row in that window would publish anyway:
after a recaption with new settings, a stale attempt could overwrite the new output with old captions.
So the operator tells its ranks which lease is theirs (``CAPTION_LEASE``: the lease's URI, the holder's token
and the ttl), and ``publish`` calls :meth:`LeaseFence.check` before the summary and again before the output.

The check passes only when the lease object still carries our token and has at least a quarter of its ttl
left, which a holder that renews every quarter ttl always has. Contenders that follow the protocol take a
lease over only after it expires, so the write that follows the check happens while nobody else may hold the
partition. A lease near expiry (renewals failing) is re-read until it is renewed or ``wait`` runs out.
Ranks started without ``CAPTION_LEASE`` (the CLI on its own, nodes other than node 0) are not fenced.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from captioning_core import storage

log = logging.getLogger(__name__)

LEASE_ENV = "CAPTION_LEASE"


class LeaseLostError(RuntimeError):
    """This attempt no longer holds the partition lease: it must not publish."""


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

    def check(self) -> None:
        """Return while the lease is ours with a quarter of its ttl left; raise :class:`LeaseLostError` if not."""
        deadline = time.monotonic() + self.wait
        margin = self.ttl / 4
        while True:
            try:
                body = json.loads(storage.read_bytes(self.uri))
            except Exception as err:  # gone, unreadable, S3 down: not provably ours
                problem = f"cannot read it ({type(err).__name__}: {err})"
            else:
                if not isinstance(body, dict) or body.get("token") != self.token:
                    holder = body.get("token") if isinstance(body, dict) else "?"
                    raise LeaseLostError(f"the partition lease {self.uri} is now held by {holder}; not publishing")
                left = float(body.get("expires_at", 0)) - time.time()
                if left >= margin:
                    return
                problem = f"it expires in {left:.1f}s (needs {margin:.1f}s)"
            if time.monotonic() >= deadline:
                raise LeaseLostError(f"the partition lease {self.uri} is not provably ours: {problem}; not publishing")
            log.warning("publish fence: waiting for the lease %s to be renewed: %s", self.uri, problem)
            time.sleep(self.poll)
