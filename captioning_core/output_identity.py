"""Which output a summary describes: the SHA-256 of the output's bytes, recorded in the summary.

A partition is published in two steps, the summary (with the settings' fingerprint) and gallery first, then
the output. When a *replacement* (a recaption with new settings) stops between the two, the old output sits
beside a summary that names the new settings; whoever decides "this partition is finished with these settings"
(the operator's skip, the ranks' ``--skip_if_existing``) must then not believe the summary. So the summary
records the digest of the output it was written for, and a summary counts only for an output with that digest.
Summaries written before this key existed carry no digest and are taken at their word.

An output is also no longer the partition's when a video it describes was replaced: a meta with a
``video_etag`` column names the object each row must be (the curation DAG's shards do), the output carries the
identity each row's result was made for, and ``changed_rows`` lists the rows where they differ. Those rows are
captioned again and the rest reused from the journal.
Standard library only: the operator imports it.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections.abc import Iterable

DIGEST_KEY = "output_sha256"
IDENTITY_COLUMN = "video_etag"  # the identity of the video a row's result is for (partition_table)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def digest_of_chunks(chunks: Iterable[bytes]) -> str:
    """``digest`` of the concatenated ``chunks`` (an object streamed, never held whole)."""
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
    return sha.hexdigest()


def describes(summary: dict, body: bytes) -> bool:
    """``summary`` was written for the output whose bytes are ``body`` (or predates the digest)."""
    return describes_digest(summary, digest(body))


def describes_digest(summary: dict, sha256: str) -> bool:
    """``summary`` was written for an output whose digest is ``sha256`` (or predates the digest)."""
    recorded = summary.get(DIGEST_KEY)
    return recorded is None or recorded == sha256


def _rows(body: bytes, uri: str) -> list[dict]:
    if uri.endswith(".gz"):
        body = gzip.decompress(body)
    return list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"), newline="")))


def changed_rows(meta: bytes, output: bytes, meta_uri: str = "", output_uri: str = "") -> list[int]:
    """Rows whose video the meta names (its ``video_etag``) is not the one the output's row was made for.

    A meta without the column names no identity: nothing changed. An output with other paths or another row
    count is not this meta's at all: every row of the meta counts as changed.
    """
    expected = _rows(meta, meta_uri)
    if not expected or IDENTITY_COLUMN not in expected[0]:
        return []
    made = _rows(output, output_uri)
    if [r.get("path") for r in made] != [r.get("path") for r in expected]:
        return list(range(len(expected)))
    return [i for i, (want, got) in enumerate(zip(expected, made, strict=True))
            if want[IDENTITY_COLUMN] and got.get(IDENTITY_COLUMN) != want[IDENTITY_COLUMN]]
