"""The row journal: per-rank part objects of finished rows in the partition's parts folder
(``captioning_core.layout``).

Each flush writes one new JSON-lines object named by process token, rank and sequence number, so ranks
never write the same object and a crash loses at most the rows not yet flushed (the runner flushes every
``--journal_flush_rows`` rows or ``--journal_flush_seconds``, whichever comes first). Records are keyed by
row position and path (content, not rank), so a rerun with another world size still resumes correctly, and
carry the fingerprint of the settings that made them: ``load`` ignores records of other settings.

Cost at scale: at ``--bs 1`` a one-object-per-row journal made resume read thousands of tiny objects one
after another (2,000 took 10.5 s on SeaweedFS). Now rows are flushed in groups, every ``COMPACT_EVERY``
flushes a writer merges its small parts into one chunk (written before the parts are deleted, so a crash
leaves duplicates, never a gap), and ``load`` reads parts in parallel.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from captioning_core import storage
from captioning_core.errors import short_error
from captioning_core.faults import FaultPlan
from captioning_core.layout import PartitionLayout
from captioning_core.partition_table import STATUS_FAILED, STATUS_OK

log = logging.getLogger(__name__)

PART_SUFFIX = ".jsonl"
CHUNK_SUFFIX = "-chunk" + PART_SUFFIX
COMPACT_EVERY = 16  # flushes merged into one chunk object
READ_WORKERS = 16
# Journal-only status: the row hit an environment error (S3, credentials, device, memory) and is retried by
# the next attempt until it has failed ``max_row_attempts`` times. Never published as such.
STATUS_TRANSIENT = "transient"


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
    fingerprint: str = ""  # id of the settings that made this result (captioning_core.fingerprint)
    video_etag: str = ""  # identity of the video this result is for (partition_table.IDENTITY_COLUMN)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> RowResult:
        raw = json.loads(line)
        return cls(int(raw["row"]), str(raw["path"]), str(raw["status"]), str(raw.get("text", "")),
                   str(raw.get("error", "")), int(raw.get("attempts", 1)), int(raw.get("tokens", 0)),
                   bool(raw.get("thumb", False)), str(raw.get("fingerprint", "")), str(raw.get("video_etag", "")))


def is_final(result: RowResult | None, max_attempts: int) -> bool:
    """A row needs no more work: captioned, failed for a data reason, or transiently failed as often as we allow."""
    if result is None:
        return False
    if result.status == STATUS_TRANSIENT:
        return result.attempts >= max_attempts
    return True


def needs_retry(result: RowResult | None, max_attempts: int) -> bool:
    """The partition may not publish while this row has no final result."""
    return not is_final(result, max_attempts)


def as_published(result: RowResult) -> RowResult:
    """A transient result that used up its attempts is published as ``failed`` with the last error."""
    if result.status != STATUS_TRANSIENT:
        return result
    return RowResult(result.row, result.path, STATUS_FAILED, "",
                     f"gave up after {result.attempts} attempts: {result.error}", result.attempts, result.tokens,
                     result.thumb, result.fingerprint, result.video_etag)


def _better(new: RowResult, old: RowResult | None) -> bool:
    if old is None:
        return True
    if (old.status == STATUS_OK) != (new.status == STATUS_OK):
        return new.status == STATUS_OK
    if new.attempts != old.attempts:
        return new.attempts > old.attempts
    return old.status == STATUS_TRANSIENT and new.status == STATUS_FAILED


def _read_part(uri: str) -> bytes | None:
    try:
        return storage.read_bytes(uri)
    except Exception as err:
        if storage.is_not_found(err):  # compacted away between list and read
            return None
        raise


def load(prefix: str, paths: list[str], fingerprint: str | None = None,
         identities: list[str] | None = None) -> dict[int, RowResult]:
    """Best record per row from every part under ``prefix`` (read in parallel).

    Records that don't match the partition are ignored, and so are records made under another fingerprint
    when ``fingerprint`` is given (``None``: any; old records without one count as ``""``), and records made
    for another video than the one the meta row names when ``identities`` gives it (a row's ``video_etag``;
    ``""`` or no list: any), so a video replaced at the same path is captioned again.
    """
    results: dict[int, RowResult] = {}
    ignored = other_settings = other_video = 0
    for _ in range(10):
        uris = [u for u in storage.list_prefix(prefix) if u.endswith(PART_SUFFIX)]
        with ThreadPoolExecutor(min(READ_WORKERS, max(1, len(uris))), thread_name_prefix="journal-read") as pool:
            bodies = list(pool.map(_read_part, uris))
        if None not in bodies:
            break
        # A part vanished between list and read: a compaction (which writes its merged object before
        # deleting) ran meanwhile. Reading the rest would miss rows; list again to see the merged object.
        log.info("journal %s: parts compacted while reading; reading again", prefix)
    for data in bodies:
        if data is None:
            continue
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
            if fingerprint is not None and rec.fingerprint != fingerprint:
                other_settings += 1
                continue
            if identities is not None and identities[rec.row] and rec.video_etag != identities[rec.row]:
                other_video += 1
                continue
            if _better(rec, results.get(rec.row)):
                results[rec.row] = rec
    if ignored:
        log.warning("journal %s: ignored %d records that do not match this partition", prefix, ignored)
    if other_settings:
        log.info("journal %s: ignored %d records made under other settings (fingerprint is %s)", prefix,
                 other_settings, fingerprint)
    if other_video:
        log.info("journal %s: ignored %d records made for another video at the row's path (its video_etag "
                 "changed)", prefix, other_video)
    return results


def _body(results: list[RowResult]) -> bytes:
    return "".join(r.to_json() + "\n" for r in results).encode("utf-8")


class PartWriter:
    """Writes this rank's finished rows: one object per ``write`` call, and every ``compact_every`` writes
    one chunk object replacing the parts written since the last chunk (so a rank keeps few objects)."""

    def __init__(self, prefix: str, rank: int, compact_every: int = COMPACT_EVERY) -> None:
        self.prefix = prefix
        self.rank = rank
        self.token = uuid.uuid4().hex[:12]
        self.seq = 0
        self.compact_every = compact_every
        self._since_chunk: list[tuple[str, list[RowResult]]] = []

    def _name(self, suffix: str) -> str:
        return storage.join(self.prefix, f"{self.token}-r{self.rank:03d}-{self.seq:06d}{suffix}")

    def write(self, results: list[RowResult]) -> str | None:
        if not results:
            return None
        self.seq += 1
        uri = self._name(PART_SUFFIX)
        storage.write_bytes(uri, _body(results))
        self._since_chunk.append((uri, list(results)))
        if self.compact_every > 1 and len(self._since_chunk) >= self.compact_every:
            self._chunk()
        return uri

    def _chunk(self) -> None:
        rows = [r for _, batch in self._since_chunk for r in batch]
        storage.write_bytes(self._name(CHUNK_SUFFIX), _body(rows))  # before any delete: never a gap
        storage.delete_many([uri for uri, _ in self._since_chunk])
        self._since_chunk = []


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
    storage.delete_many(before)


def counts(results: dict[int, RowResult]) -> dict[str, int]:
    ok = sum(1 for r in results.values() if r.status == STATUS_OK)
    failed = sum(1 for r in results.values() if r.status in (STATUS_FAILED, STATUS_TRANSIENT))
    empty = sum(1 for r in results.values() if r.status == STATUS_OK and not r.text.strip())
    return {"rows": len(results), "captioned": ok, "failed": failed, "empty": empty}


class JournalWriter:
    """Writes journal parts on a background thread; errors surface on the next call or on close.

    Rows are buffered and flushed every ``flush_rows`` rows or ``flush_seconds`` after the oldest unflushed
    row, whichever comes first: that is the crash-loss bound. Thumbnails are written at once (before any
    row that points at them is flushed).
    """

    def __init__(self, writer: PartWriter, faults: FaultPlan, layout: PartitionLayout, fingerprint: str,
                 flush_rows: int = 1, flush_seconds: float = 0.0) -> None:
        self._writer = writer
        self._layout = layout
        self._fingerprint = fingerprint  # thumbnails go under the settings they were made with
        self._faults = faults
        self._flush_rows = flush_rows
        self._flush_seconds = flush_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._buffer: list[RowResult] = []
        self._oldest = 0.0
        self.rows_written = 0
        self._thread = threading.Thread(target=self._loop, name="journal-writer", daemon=True)
        self._thread.start()

    def _timeout(self) -> float | None:
        if not self._buffer or self._flush_seconds <= 0:
            return None
        return max(0.0, self._oldest + self._flush_seconds - time.monotonic())

    def _loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._timeout())
            except queue.Empty:
                item = ()
            try:
                if self._error is None:
                    if item:
                        batch, thumbs = item
                        for row, data in thumbs.items():  # before the rows that point at them
                            storage.write_bytes(self._layout.thumb(row, self._fingerprint), data)
                        if not self._buffer:
                            self._oldest = time.monotonic()
                        self._buffer.extend(batch)
                    due = self._timeout()
                    if item is None or len(self._buffer) >= self._flush_rows or (due is not None and due <= 0):
                        self._flush()
            except BaseException as err:  # surfaced to the main thread
                self._error = err
            if item is None:
                return

    def _flush(self) -> None:
        if not self._buffer:
            return
        self._writer.write(self._buffer)
        self.rows_written += len(self._buffer)
        self._buffer = []
        self._faults.after_journal(self.rows_written)

    def put(self, results: list[RowResult], thumbs: dict[int, bytes] | None = None) -> None:
        self._raise()
        self._queue.put((list(results), dict(thumbs or {})))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing the journal failed: {short_error(self._error)}") from self._error
