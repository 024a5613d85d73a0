"""The per-rank loop: skip finished rows, decode ahead in the background, batch, generate, journal, publish.

Decoding, frame sampling, preprocessing and S3 reads for the next batches run in a thread pool (bounded by
``prefetch_batches`` and by ``prefetch_bytes`` of prepared tensors) while the current batch generates;
journal writes go through a writer thread. Every row ends as a RowResult of one of two failure classes:
a data failure (the video itself is unreadable or not there) is final; anything the environment caused
(S3, credentials, network, model runtime, memory) is ``transient``: the row is retried by the next attempt
and holds back the publish until it has failed ``max_row_attempts`` times. Nothing one row does stops the
others, but ``max_consecutive_errors`` transient failures in a row stop the rank early.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from captioning_core import fingerprint, gallery, journal, partition_table, signals, storage, video
from captioning_core.batching import BatchPlanner, padded_tokens
from captioning_core.config import RunConfig
from captioning_core.decode_sandbox import DecodeSandbox
from captioning_core.errors import TRANSIENT, VideoChangedError, classify, is_oom, short_error
from captioning_core.faults import FaultPlan
from captioning_core.journal import STATUS_TRANSIENT, JournalWriter, RowResult
from captioning_core.lease_fence import LeaseFence
from captioning_core.models.base import Captioner
from captioning_core.partition_table import STATUS_FAILED, STATUS_OK, Partition
from captioning_core.paths import resolve_video
from captioning_core.prefetch import NOT_READY, BytePrefetcher, nbytes
from captioning_core.progress import Progress
from captioning_core.publish import publish
from captioning_core.sharding import RankInfo, rows_for_rank
from captioning_core.stats import RankStats

log = logging.getLogger(__name__)

#: videos prepared ahead per batch when ``--bs`` sets no cap (prefetch_bytes and the token budget bound it)
MAX_BATCH_VIDEOS = 256


@dataclass
class Prepared:
    row: int
    path: str
    item: object = None
    error: str = ""
    transient: bool = False  # the error is the environment's, not the video's
    outage: bool = False  # ... and the store itself did not answer: no row attempt (storage.service_answers)
    seconds: float = 0.0
    thumb: bytes | None = None
    nbytes: int = 0
    tokens: int | None = None  # prefill tokens (captioner.prefill_tokens), None if unknown
    video_etag: str = ""  # identity of the bytes read (storage.fetch_to_local); "" if none were


@dataclass
class RankRunner:
    cfg: RunConfig
    info: RankInfo
    captioner: Captioner
    faults: FaultPlan = field(default_factory=FaultPlan)
    fence: LeaseFence | None = None  # publish only while the attempt holds the partition lease

    def run(self) -> RankStats:
        cfg, info = self.cfg, self.info
        self.fingerprint = fingerprint.compute(cfg)
        fp_id = self.fingerprint["id"]
        stats = RankStats(info.rank, info.world_size, fingerprint=fp_id)
        partition = partition_table.read_partition(cfg.meta_path)
        self._identities = partition.identities
        previous = journal.load(cfg.layout.parts, partition.paths, fp_id, self._identities)
        owned = rows_for_rank(len(partition), info)
        pending = [r for r in owned if not journal.is_final(previous.get(r), cfg.max_row_attempts)]
        stats.rows_owned, stats.rows_skipped = len(owned), len(owned) - len(pending)
        log.info("rank %d/%d: %d rows in partition, %d owned, %d already done, %d to caption (fingerprint %s)",
                 info.rank, info.world_size, len(partition), len(owned), stats.rows_skipped, len(pending), fp_id)
        gathered: list[tuple[int, int, list[int]]] = []
        if pending and self._preflight(partition, pending[0], stats):
            self.captioner.setup_preprocessing()
            with self._prefetched(partition, pending, stats) as prepared:  # decoding starts while the model loads
                started = time.perf_counter()
                self.captioner.setup()
                stats.model_loaded = True
                stats.load_seconds = time.perf_counter() - started
                gathered = self._caption_rows(prepared, len(pending), previous, stats)
        if cfg.gather == "allgather":
            return self._finish_allgather(partition, gathered, stats)
        self._write_stats(stats)
        if not stats.needs_retry:
            publish(cfg, partition, self.fingerprint, faults=self.faults, fence=self.fence)
        return stats

    def _preflight(self, partition: Partition, row: int, stats: RankStats) -> bool:
        """Before loading any model: can this rank read its first pending video? If the store does not answer
        (S3 down, credentials it refuses) the rank stops at once, model not loaded, and no row attempt is
        counted: an outage is not the row's. If the store answers, the row's own trouble (a refused object)
        is left to the loop, which records it as the row's attempt."""
        path = partition.paths[row]
        try:
            uri = resolve_video(path, self.cfg)
        except Exception:  # a data failure of this row: the loop records it
            return True
        try:
            storage.check_readable(uri)
            return True
        except Exception as err:
            if classify(err, "preflight") != TRANSIENT or storage.service_answers(uri):
                return True  # the video's own problem (not there, a directory, refused): the loop records it
            error = short_error(err)
        self._stop_for_outage(stats, f"cannot read the first pending video ({error}); model not loaded", error)
        return False

    def _stop_for_outage(self, stats: RankStats, why: str, error: str) -> None:
        stats.transient += 1
        stats.last_transient_error = error
        stats.stopped_early = f"{why}; the store does not answer: an outage, no row attempt counted"
        log.error("rank %d: %s", self.info.rank, stats.stopped_early)

    # -- the loop -------------------------------------------------------------------------------------
    def _caption_rows(self, fetcher: BytePrefetcher, count: int, previous: dict,
                      stats: RankStats) -> list[tuple[int, int, list[int]]]:
        """Pool prepared videos, take batches of similar token counts from the pool (``take_batch``), generate,
        journal. The pool is filled without waiting from what is already prepared, and waited for only while
        it cannot make one full batch (``batch_tokens`` or ``bs`` reached) and rows remain."""
        cfg = self.cfg
        flush_rows = 1 if self.faults.flushes_every_batch else cfg.journal_flush_rows
        writer = JournalWriter(journal.PartWriter(cfg.layout.parts, self.info.rank), self.faults,
                               cfg.layout, self.fingerprint["id"], flush_rows, cfg.journal_flush_seconds)
        progress = Progress(self.info, count, cfg.log_every)
        gathered: list[tuple[int, int, list[int]]] = []
        self._consecutive = 0
        self._planner = BatchPlanner(cfg.batch_tokens, cfg.bs)  # lowered after an out-of-memory batch
        ahead = cfg.prefetch_batches + 1
        pool: list[Prepared] = []
        exhausted = False
        t0 = time.perf_counter()
        try:
            while not stats.stopped_early:
                signals.raise_if_stopped()  # SIGTERM: no new batch; `finally` flushes the journal
                while not exhausted and not self._pool_full(pool, ahead):
                    waited = time.perf_counter()
                    got = fetcher.get(block=not self._pool_full(pool, 1))
                    stats.input_wait_seconds += time.perf_counter() - waited
                    if got is NOT_READY:
                        break
                    if got is None:
                        exhausted = True
                        break
                    prep = got[0]
                    stats.decode_seconds += prep.seconds
                    if prep.error:
                        self._release([prep])
                        if prep.outage:  # journaled nowhere: the row stays pending, its attempts untouched
                            self._stop_for_outage(stats, f"row {prep.row}: {prep.error}", prep.error)
                            break
                        results = [self._failed(prep, prep.error, previous)]
                        writer.put(results)
                        self._account(results, stats, progress, t0)
                        if stats.stopped_early:
                            break
                        continue
                    prep.tokens = self._tokens(prep)
                    pool.append(prep)
                if not pool or stats.stopped_early:
                    if exhausted or stats.stopped_early:
                        break
                    continue
                picked = set(self._planner.pick([p.tokens for p in pool]))
                batch = [p for i, p in enumerate(pool) if i in picked]
                pool = [p for i, p in enumerate(pool) if i not in picked]
                results = self._caption_batch(batch, previous, stats, gathered)
                writer.put(results, {p.row: p.thumb for p in batch if p.thumb})
                self._account(results, stats, progress, t0)
        finally:
            self._release(pool)  # rows never generated stay pending for the next attempt
            writer.close()
        stats.wall_seconds = time.perf_counter() - t0
        progress.done(stats)
        return gathered

    def _tokens(self, prep: Prepared) -> int | None:
        try:
            tokens = self.captioner.prefill_tokens(prep.item)
        except Exception as err:  # batching by count still works
            log.warning("rank %d: row %d: no token count (%s)", self.info.rank, prep.row, short_error(err))
            return None
        return None if tokens is None else int(tokens)

    def _pool_full(self, pool: list[Prepared], batches: int) -> bool:
        return self._planner.pool_full([p.tokens for p in pool], batches)

    def _account(self, results: list[RowResult], stats: RankStats, progress: Progress, t0: float) -> None:
        stats.rows_processed += len(results)
        for res in results:
            if res.status == STATUS_OK:
                stats.captioned += 1
            elif journal.is_final(res, self.cfg.max_row_attempts):
                stats.failed += 1
            else:
                stats.transient += 1
            if res.status == STATUS_TRANSIENT:
                self._consecutive += 1
                stats.last_transient_error = res.error
            else:
                self._consecutive = 0
        if self._consecutive >= self.cfg.max_consecutive_errors:
            stats.stopped_early = f"{self._consecutive} consecutive transient failures"
            log.error("rank %d: stopping early after %d consecutive transient failures (last: %s)",
                      self.info.rank, self._consecutive, stats.last_transient_error)
        stats.wall_seconds = time.perf_counter() - t0
        progress.update(stats)

    @contextlib.contextmanager
    def _prefetched(self, partition: Partition, rows: list[int], stats: RankStats) -> Iterator[BytePrefetcher]:
        """Prepared videos in row order. Decoding starts on entry (so it overlaps the model load); afterwards up
        to ``prefetch_batches`` batches decode ahead, within ``prefetch_bytes`` of prepared tensors."""
        paths = partition.paths
        cache_dir = tempfile.mkdtemp(prefix="caption-cache-")
        per_batch = self.cfg.bs or MAX_BATCH_VIDEOS  # without --bs, the bytes and the token budget bound it
        sandbox = DecodeSandbox(self.cfg.decode_timeout)  # a video that kills its decoder fails its row only
        with video.decode_policy(video.DecodePolicy(sandbox, self.cfg.max_decode_bytes)):
            fetcher = BytePrefetcher(rows, lambda row: self._prepare_one(row, paths[row], cache_dir),
                                     lambda prep: prep.nbytes, self.cfg.prefetch_bytes,
                                     per_batch * (self.cfg.prefetch_batches + 1), self.cfg.prefetch_workers)
            self._fetcher = fetcher
            try:
                yield fetcher
            finally:
                fetcher.close()
                sandbox.close()
                stats.prefetch_peak_bytes = fetcher.peak
                shutil.rmtree(cache_dir, ignore_errors=True)

    def _release(self, batch: list[Prepared]) -> None:
        """The model is done with these items: their bytes leave the prefetch budget."""
        for prep in batch:
            self._fetcher.release(prep.nbytes)
            prep.item = None

    def _prepare_one(self, row: int, path: str, cache_dir: str) -> Prepared:
        started = time.perf_counter()
        prep = Prepared(row, path)
        local, owned = None, False
        try:
            stage = "path"
            uri = resolve_video(path, self.cfg)
            stage = "fetch"
            local, owned, prep.video_etag = storage.fetch_to_local(uri, cache_dir)  # a local file is read here
            expected = self._expected_identity(row)
            if expected and prep.video_etag != expected:
                raise VideoChangedError(f"video changed since the meta was written: {path} is now "
                                        f"{prep.video_etag}, the meta row names {expected}")
            stage = "decode"
            prep.item = self.captioner.prepare(local)
            frames = self.captioner.thumbnail_frames(prep.item)
            if frames is not None and len(frames):
                prep.thumb = gallery.thumbnail_strip(frames)
            prep.nbytes = nbytes(prep.item)
        except Exception as err:  # any per-row problem becomes that row's result, never the rank's
            prep.item = None
            prep.error = (f"video not found: {path}" if storage.is_not_found(err) else
                          f"not a file: {path}" if isinstance(err, IsADirectoryError) else short_error(err))
            prep.transient = classify(err, stage) == TRANSIENT
            prep.outage = prep.transient and stage == "fetch" and not storage.service_answers(uri)
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
            if len(batch) == 1:  # the model runtime failed on this row alone (errors.classify: transient)
                self._release(batch)
                status = STATUS_TRANSIENT if classify(err, "generate") == TRANSIENT else STATUS_FAILED
                return [self._result(batch[0], status, "", short_error(err), previous)]
            log.warning("rank %d: batch of %d failed (%s); retrying one row at a time",
                        self.info.rank, len(batch), "out of memory" if is_oom(err) else short_error(err))
            if is_oom(err):
                self._lower_budget(batch)
            results = []
            for prep in batch:
                results.extend(self._caption_batch([prep], previous, stats, gathered))
            return results
        self._release(batch)
        stats.output_tokens += sum(len(row_ids) for row_ids in ids)
        results = []
        for prep, row_ids in zip(batch, ids, strict=True):
            gathered.append((prep.row, 1, row_ids))
            results.append(self._result(prep, STATUS_OK, self.captioner.decode(row_ids), "", previous,
                                        tokens=len(row_ids)))
        return results

    def _lower_budget(self, batch: list[Prepared]) -> None:
        what = self._planner.after_oom([p.tokens for p in batch])
        log.warning("rank %d: out of memory on a batch of %d: %s for the rest of this run", self.info.rank,
                    len(batch), what)

    def _generate(self, batch: list[Prepared], stats: RankStats) -> list[list[int]]:
        self.faults.before_generate([p.row for p in batch])
        started = time.perf_counter()
        try:
            return self.captioner.generate([p.item for p in batch])
        finally:
            stats.busy_seconds += time.perf_counter() - started
            stats.generate_calls += 1
            if all(p.tokens is not None for p in batch):
                padded = padded_tokens([p.tokens for p in batch])
                stats.prefill_tokens += padded
                stats.padding_tokens += padded - sum(p.tokens for p in batch)

    def _result(self, prep: Prepared, status: str, text: str, error: str, previous: dict,
                tokens: int = 0) -> RowResult:
        prior = previous.get(prep.row)
        attempts = prior.attempts + 1 if prior is not None else 1
        if status != STATUS_OK:
            log.warning("rank %d: row %d %s (attempt %d): %s", self.info.rank, prep.row,
                        "failed" if status == STATUS_FAILED else "hit a transient error", attempts, error)
        # the result is for the video the meta row names (a caption only ever is: see _prepare_one), else
        # for the bytes read
        return RowResult(prep.row, prep.path, status, text, error, attempts, tokens, prep.thumb is not None,
                         self.fingerprint["id"], self._expected_identity(prep.row) or prep.video_etag)

    def _expected_identity(self, row: int) -> str:
        identities = getattr(self, "_identities", None)
        return identities[row] if identities else ""

    def _failed(self, prep: Prepared, error: str, previous: dict) -> RowResult:
        return self._result(prep, STATUS_TRANSIENT if prep.transient else STATUS_FAILED, "", error, previous)

    # -- endings --------------------------------------------------------------------------------------
    def _write_stats(self, stats: RankStats) -> None:
        uri = self.cfg.layout.stats_object(self.info.rank, time.time_ns())
        try:
            storage.write_bytes(uri, json.dumps(stats.to_dict()).encode())
        except Exception as err:
            if not stats.needs_retry:
                raise
            log.warning("rank %d: could not write stats: %s", self.info.rank, short_error(err))

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
        publish(self.cfg, partition, self.fingerprint, overrides={r: self.captioner.decode(i)
                                                                  for r, i in decoded.items()}, faults=self.faults,
                fence=self.fence)
        return stats
