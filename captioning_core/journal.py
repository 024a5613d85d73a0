"""The row journal: per-rank part objects of finished rows under ``{output}.parts/``.

Each flush writes one new JSON-lines object named by process token, rank and sequence number, so ranks
never write the same object and a crash loses at most the rows not yet flushed. Records are keyed by row
position and path (content, not rank), so a rerun with another world size still resumes correctly.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict, dataclass

from captioning_core import storage
from captioning_core.metadata import STATUS_FAILED, STATUS_OK

log = logging.getLogger(__name__)

PART_SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)  # slots: a million rows of results stay small
class RowResult:
    row: int
    path: str
    status: str
    text: str = ""
    error: str = ""
    attempts: int = 1
    tokens: int = 0  # generated tokens (a caption at max_new_tokens was probably cut off)
    thumb: bool = False  # a thumbnail strip was written for the gallery

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> RowResult:
        raw = json.loads(line)
        return cls(int(raw["row"]), str(raw["path"]), str(raw["status"]), str(raw.get("text", "")),
                   str(raw.get("error", "")), int(raw.get("attempts", 1)), int(raw.get("tokens", 0)),
                   bool(raw.get("thumb", False)))


def is_final(result: RowResult | None, max_attempts: int) -> bool:
    """A row needs no more work: captioned, or failed as often as we allow."""
    if result is None:
        return False
    return result.status == STATUS_OK or result.attempts >= max_attempts


def _better(new: RowResult, old: RowResult | None) -> bool:
    if old is None:
        return True
    if (old.status == STATUS_OK) != (new.status == STATUS_OK):
        return new.status == STATUS_OK
    return new.attempts > old.attempts


def load(prefix: str, paths: list[str]) -> dict[int, RowResult]:
    """Best record per row from every part under ``prefix``; records that don't match the partition are ignored."""
    results: dict[int, RowResult] = {}
    ignored = 0
    for uri in storage.list_prefix(prefix):
        if not uri.endswith(PART_SUFFIX):
            continue
        try:
            data = storage.read_bytes(uri)
        except Exception as err:
            if storage.is_not_found(err):  # compacted away between list and read
                continue
            raise
        for line in data.decode("utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = RowResult.from_json(line)
            except (ValueError, KeyError):
                ignored += 1
                continue
            if not (0 <= rec.row < len(paths)) or paths[rec.row] != rec.path:
                ignored += 1
                continue
            if _better(rec, results.get(rec.row)):
                results[rec.row] = rec
    if ignored:
        log.warning("journal %s: ignored %d records that do not match this partition", prefix, ignored)
    return results


class PartWriter:
    """Writes this rank's finished rows; one object per ``write`` call."""

    def __init__(self, prefix: str, rank: int) -> None:
        self.prefix = prefix
        self.rank = rank
        self.token = uuid.uuid4().hex[:12]
        self.seq = 0

    def write(self, results: list[RowResult]) -> str | None:
        if not results:
            return None
        self.seq += 1
        uri = storage.join(self.prefix, f"{self.token}-r{self.rank:03d}-{self.seq:06d}{PART_SUFFIX}")
        body = "".join(r.to_json() + "\n" for r in results).encode("utf-8")
        storage.write_bytes(uri, body)
        return uri


def compact(prefix: str, results: dict[int, RowResult]) -> None:
    """Replace the many small parts by one object holding the best record per row.

    The compacted object is written before anything is deleted, so a crash in between leaves
    duplicates (resolved by ``load``), never a gap.
    """
    before = [u for u in storage.list_prefix(prefix) if u.endswith(PART_SUFFIX)]
    if len(before) <= 1:
        return
    writer = PartWriter(prefix, rank=999)
    writer.token = f"compact-{writer.token}"
    writer.write([results[r] for r in sorted(results)])
    for uri in before:
        storage.delete(uri)


def counts(results: dict[int, RowResult]) -> dict[str, int]:
    ok = sum(1 for r in results.values() if r.status == STATUS_OK)
    failed = sum(1 for r in results.values() if r.status == STATUS_FAILED)
    empty = sum(1 for r in results.values() if r.status == STATUS_OK and not r.text.strip())
    return {"rows": len(results), "captioned": ok, "failed": failed, "empty": empty}
