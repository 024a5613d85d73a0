"""The per-rank loop: skip finished rows, decode ahead in the background, batch, generate, journal, publish.

Decoding, frame sampling, preprocessing and S3 reads for the next batches run in a thread pool (bounded
by ``prefetch_batches``) while the current batch generates; journal writes go through a writer thread.
Every row ends as a RowResult: a caption, or a failure with its reason. Nothing one row does stops the
others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

from captioning_core import gallery, journal, metadata, runtime, storage
from captioning_core.config import RunConfig
from captioning_core.faults import FaultPlan
from captioning_core.journal import RowResult
from captioning_core.metadata import STATUS_FAILED, STATUS_OK, Partition
from captioning_core.models.base import Captioner
from captioning_core.paths import resolve_video
from captioning_core.progress import Progress
from captioning_core.sharding import RankInfo, rows_for_rank

log = logging.getLogger(__name__)

_OOM = re.compile(r"out of memory|allocate memory|memory allocation|\bOOM\b", re.IGNORECASE)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or bool(_OOM.search(str(err)))


def short_error(err: BaseException, limit: int = 500) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class RankStats:
    rank: int
    world_size: int
    rows_owned: int = 0
    rows_skipped: int = 0
    rows_processed: int = 0
    captioned: int = 0
    failed: int = 0
    generate_calls: int = 0
    load_seconds: float = 0.0
    busy_seconds: float = 0.0
    wall_seconds: float = 0.0
    decode_seconds: float = 0.0
    input_wait_seconds: float = 0.0  # the model loop waiting for decoded videos: >0 means decode-bound
    started_at: float = field(default_factory=time.time)

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_processed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(busy_fraction=round(self.busy_fraction, 4), rows_per_second=round(self.rows_per_second, 4),
                   decode_seconds_per_row=round(self.decode_seconds / self.rows_processed, 4)
                   if self.rows_processed else 0.0)
        return out


@dataclass
class Prepared:
    row: int
    path: str
    item: object = None
    error: str = ""
    seconds: float = 0.0
    thumb: bytes | None = None


class JournalWriter:
    """Writes journal parts on a background thread; errors surface on the next call or on close."""

    def __init__(self, writer: journal.PartWriter, faults: FaultPlan, thumbs_prefix: str) -> None:
        self._writer = writer
        self._thumbs_prefix = thumbs_prefix
        self._faults = faults
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self.rows_written = 0
        self._thread = threading.Thread(target=self._loop, name="journal-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, thumbs = item
            try:
                if self._error is None:
                    for row, data in thumbs.items():  # before the rows that point at them
                        storage.write_bytes(storage.join(self._thumbs_prefix, gallery.thumb_name(row)), data)
                    self._writer.write(batch)
                    self.rows_written += len(batch)
                    self._faults.after_journal(self.rows_written)
            except BaseException as err:  # surfaced to the main thread
                self._error = err

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


@dataclass
class RankRunner:
    cfg: RunConfig
    info: RankInfo
    captioner: Captioner
    faults: FaultPlan = field(default_factory=FaultPlan)

    def run(self) -> RankStats:
        cfg, info = self.cfg, self.info
        stats = RankStats(info.rank, info.world_size)
        partition = metadata.read_partition(cfg.meta_path)
        previous = journal.load(cfg.parts_prefix, partition.paths)
        owned = rows_for_rank(len(partition), info)
        pending = [r for r in owned if not journal.is_final(previous.get(r), cfg.max_row_attempts)]
        stats.rows_owned, stats.rows_skipped = len(owned), len(owned) - len(pending)
        log.info("rank %d/%d: %d rows in partition, %d owned, %d already done, %d to caption",
                 info.rank, info.world_size, len(partition), len(owned), stats.rows_skipped, len(pending))
        gathered: list[tuple[int, int, list[int]]] = []
        if pending:
            self.captioner.setup_preprocessing()
            with self._prefetched(partition, pending) as prepared:  # decoding starts while the model loads
                started = time.perf_counter()
                self.captioner.setup()
                stats.load_seconds = time.perf_counter() - started
                gathered = self._caption_rows(prepared, len(pending), previous, stats)
        if cfg.gather == "allgather":
            return self._finish_allgather(partition, gathered, stats)
        self._write_stats(stats)
        publish(cfg, partition)
        return stats

    # -- the loop -------------------------------------------------------------------------------------
    def _caption_rows(self, prepared: Iterator[Prepared], count: int, previous: dict,
                      stats: RankStats) -> list[tuple[int, int, list[int]]]:
        cfg = self.cfg
        writer = JournalWriter(journal.PartWriter(cfg.parts_prefix, self.info.rank), self.faults,
                               gallery.gallery_prefix(cfg.output))
        progress = Progress(self.info, count, cfg.log_every)
        gathered: list[tuple[int, int, list[int]]] = []
        t0 = time.perf_counter()
        try:
            batch: list[Prepared] = []
            while True:
                runtime.raise_if_stopped()  # SIGTERM: no new batch; `finally` flushes the journal
                waited = time.perf_counter()
                prep = next(prepared, None)
                stats.input_wait_seconds += time.perf_counter() - waited
                if prep is None:
                    break
                stats.decode_seconds += prep.seconds
                if prep.error:
                    results = [self._failed(prep, prep.error, previous)]
                    writer.put(results)
                    self._account(results, stats, progress, t0)
                    continue
                batch.append(prep)
                if len(batch) >= cfg.bs:
                    results = self._caption_batch(batch, previous, stats, gathered)
                    writer.put(results, {p.row: p.thumb for p in batch if p.thumb})
                    self._account(results, stats, progress, t0)
                    batch = []
            if batch:
                results = self._caption_batch(batch, previous, stats, gathered)
                writer.put(results, {p.row: p.thumb for p in batch if p.thumb})
                self._account(results, stats, progress, t0)
        finally:
            writer.close()
        stats.wall_seconds = time.perf_counter() - t0
        progress.done(stats)
        return gathered

    def _account(self, results: list[RowResult], stats: RankStats, progress: Progress, t0: float) -> None:
        stats.rows_processed += len(results)
        stats.captioned += sum(r.status == STATUS_OK for r in results)
        stats.failed += sum(r.status == STATUS_FAILED for r in results)
        stats.wall_seconds = time.perf_counter() - t0
        progress.update(stats)

    @contextlib.contextmanager
    def _prefetched(self, partition: Partition, rows: list[int]) -> Iterator[Iterator[Prepared]]:
        """Prepared videos in row order. The first ``prefetch_batches + 1`` batches start decoding on entry
        (so they decode while the model loads); afterwards up to that many batches decode ahead."""
        paths = partition.paths
        window = self.cfg.bs * (self.cfg.prefetch_batches + 1)
        cache_dir = tempfile.mkdtemp(prefix="caption-cache-")
        pool = ThreadPoolExecutor(self.cfg.prefetch_workers, thread_name_prefix="decode")
        futures: deque = deque(pool.submit(self._prepare_one, row, paths[row], cache_dir) for row in rows[:window])
        later = iter(rows[window:])

        def in_order() -> Iterator[Prepared]:
            while futures:
                prep = futures.popleft().result()
                nxt = next(later, None)
                if nxt is not None:
                    futures.append(pool.submit(self._prepare_one, nxt, paths[nxt], cache_dir))
                yield prep

        try:
            yield in_order()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(cache_dir, ignore_errors=True)

    def _prepare_one(self, row: int, path: str, cache_dir: str) -> Prepared:
        started = time.perf_counter()
        prep = Prepared(row, path)
        local, owned = None, False
        try:
            uri = resolve_video(path, self.cfg)
            local, owned = storage.fetch_to_local(uri, cache_dir)
            prep.item = self.captioner.prepare(local)
            frames = self.captioner.thumbnail_frames(prep.item)
            if frames is not None and len(frames):
                prep.thumb = gallery.thumbnail_strip(frames)
        except Exception as err:  # any per-row problem becomes that row's failure
            if storage.is_not_found(err):
                prep.error = f"video not found: {path}"
            else:
                prep.error = short_error(err)
        finally:
            if owned and local and os.path.exists(local):
                os.unlink(local)
        prep.seconds = time.perf_counter() - started
        return prep

    def _caption_batch(self, batch: list[Prepared], previous: dict, stats: RankStats,
                       gathered: list) -> list[RowResult]:
        try:
            ids = self._generate(batch, stats)
        except Exception as err:
            if len(batch) == 1:
                return [self._failed(batch[0], short_error(err), previous)]
            log.warning("rank %d: batch of %d failed (%s); retrying one row at a time",
                        self.info.rank, len(batch), "out of memory" if is_oom(err) else short_error(err))
            results = []
            for prep in batch:
                results.extend(self._caption_batch([prep], previous, stats, gathered))
            return results
        results = []
        for prep, row_ids in zip(batch, ids, strict=True):
            gathered.append((prep.row, 1, row_ids))
            results.append(RowResult(prep.row, prep.path, STATUS_OK, self.captioner.decode(row_ids),
                                     "", self._attempt(prep.row, previous), len(row_ids), prep.thumb is not None))
        return results

    def _generate(self, batch: list[Prepared], stats: RankStats) -> list[list[int]]:
        self.faults.before_generate([p.row for p in batch])
        started = time.perf_counter()
        try:
            return self.captioner.generate([p.item for p in batch])
        finally:
            stats.busy_seconds += time.perf_counter() - started
            stats.generate_calls += 1

    def _attempt(self, row: int, previous: dict) -> int:
        prior = previous.get(row)
        return prior.attempts + 1 if prior is not None else 1

    def _failed(self, prep: Prepared, error: str, previous: dict) -> RowResult:
        log.warning("rank %d: row %d failed: %s", self.info.rank, prep.row, error)
        return RowResult(prep.row, prep.path, STATUS_FAILED, "", error, self._attempt(prep.row, previous),
                         thumb=prep.thumb is not None)

    # -- endings --------------------------------------------------------------------------------------
    def _write_stats(self, stats: RankStats) -> None:
        uri = storage.join(self.cfg.parts_prefix, "stats", f"rank{self.info.rank:03d}-{time.time_ns()}.json")
        storage.write_bytes(uri, json.dumps(stats.to_dict()).encode())

    def _finish_allgather(self, partition: Partition, gathered: list, stats: RankStats) -> RankStats:
        """The seed's path: token ids AllGathered (padded to pad_length), rank 0 decodes and publishes."""
        from captioning_core import runtime

        self._write_stats(stats)
        if self.info.rank == 0 and getattr(self.captioner, "tokenizer", None) is None:
            self.captioner.setup()  # rank 0 decodes every rank's ids; load before joining the group
        # Joined only now: mindnlp's from_pretrained refuses to load inside an initialised group.
        runtime.init_collective()
        pad = int(getattr(getattr(self.captioner, "tokenizer", None), "pad_token_id", None) or 0)
        counts = runtime.allgather_rows([[len(gathered)]], 1, 0)
        most = max(c[0] for c in counts)
        rows = [[row, ok, len(ids), *ids] for row, ok, ids in gathered]
        rows += [[-1, 0, 0]] * (most - len(rows))
        everything = runtime.allgather_rows(rows, self.cfg.pad_length + 3, pad) if most else []
        if self.info.rank != 0:
            return stats
        decoded = {}
        for row, ok, n, *ids in everything:
            if row >= 0 and ok:
                decoded[row] = ids[:n]
        publish(self.cfg, partition, overrides={r: self.captioner.decode(i) for r, i in decoded.items()})
        return stats


def publish(cfg: RunConfig, partition: Partition, overrides: dict[int, str] | None = None) -> bool:
    """Publish the final output if every row is accounted for; returns whether this call published.

    With ``skip_if_existing`` the write is conditional (first publisher wins); without it the output is
    replaced atomically. Either way readers never see a partial object.
    """
    results = journal.load(cfg.parts_prefix, partition.paths)
    missing = [r for r in range(len(partition)) if r not in results]
    if missing:
        log.info("not publishing yet: %d rows still without a result (first: %s)", len(missing), missing[:5])
        return False
    for row, text in (overrides or {}).items():
        if results[row].status == STATUS_OK:
            results[row] = replace(results[row], text=text)
    table = metadata.merge_results(partition, results)
    body = metadata.serialise(table, cfg.output)
    if cfg.skip_if_existing:
        published = storage.put_if_absent(cfg.output, body)
    else:
        storage.write_bytes(cfg.output, body)
        published = True
    if published:
        ranks = _load_rank_stats(cfg)
        summary = {"output": cfg.output, "meta_path": cfg.meta_path, "model": cfg.model,
                   **journal.counts(results), **_latest_attempt(ranks), "ranks": ranks}
        storage.write_bytes(cfg.summary_uri, json.dumps(summary, indent=1).encode())
        rows = [gallery.GalleryRow(r, res.path, res.status, res.text, res.error, res.tokens, res.thumb)
                for r, res in sorted(results.items())]
        index = gallery.write_gallery(cfg.output, rows, summary, cfg.max_new_tokens)
        journal.compact(cfg.parts_prefix, results)
        log.info("published %s (%s); gallery %s", cfg.output, journal.counts(results), index)
    return published


def _latest_attempt(ranks: list[dict]) -> dict:
    """Rows skipped, rate and model-busy fraction of the most recent attempt (newest stats per rank)."""
    newest: dict[int, dict] = {}
    for stat in ranks:
        if stat["rank"] not in newest or stat.get("started_at", 0) > newest[stat["rank"]].get("started_at", 0):
            newest[stat["rank"]] = stat
    latest = list(newest.values())
    wall = sum(s.get("wall_seconds", 0.0) for s in latest)
    return {"skipped": sum(s.get("rows_skipped", 0) for s in latest),
            "rows_per_second": round(sum(s.get("rows_per_second", 0.0) for s in latest), 3),
            "model_busy": round(sum(s.get("busy_seconds", 0.0) for s in latest) / wall, 3) if wall else None}


def _load_rank_stats(cfg: RunConfig) -> list[dict]:
    out = []
    for uri in storage.list_prefix(storage.join(cfg.parts_prefix, "stats/")):
        try:
            out.append(json.loads(storage.read_bytes(uri)))
        except Exception as err:  # stats are informative; never block a publish on them
            log.warning("unreadable stats object %s: %s", uri, short_error(err))
    return out
