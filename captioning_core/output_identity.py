"""Which output a summary describes: the SHA-256 of the output's bytes, recorded in the summary.

A partition is published in two steps, the summary (with the settings' fingerprint) and gallery first, then
the output. When a *replacement* (a recaption with new settings) stops between the two, the old output sits
beside a summary that names the new settings; whoever decides "this partition is finished with these settings"
(the operator's skip, the ranks' ``--skip_if_existing``) must then not believe the summary. So the summary
records the digest of the output it was written for, and a summary counts only for an output with that digest.
Summaries written before this key existed carry no digest and are taken at their word.
Standard library only: the operator imports it.
"""

from __future__ import annotations

import hashlib

DIGEST_KEY = "output_sha256"


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def describes(summary: dict, body: bytes) -> bool:
    """``summary`` was written for the output whose bytes are ``body`` (or predates the digest)."""
    recorded = summary.get(DIGEST_KEY)
    return recorded is None or recorded == digest(body)
