"""Publishing a partition: summary and gallery first, the output CSV last, as the commit marker.

Readers (the DAG, ``--skip_if_existing``, users) treat the output's existence as "this partition is done", so
it must be the last object written: a crash after the gallery and before the output leaves an unpublished
partition that the next attempt completes, never an output without its summary. A partition publishes only
when every row has a final result under the current fingerprint; a row still owed a retry after a transient
error holds it back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from captioning_core import gallery, journal, output_identity, partition_table, stats, storage
from captioning_core.config import RunConfig
from captioning_core.fingerprint import SUMMARY_KEY
from captioning_core.lease_fence import LeaseFence
from captioning_core.partition_table import STATUS_OK, Partition

log = logging.getLogger(__name__)


def final_results(cfg: RunConfig, partition: Partition, fp_id: str) -> tuple[dict, dict, list[int]]:
    """(row -> journaled RowResult, row -> RowResult as published, rows still without a final result)."""
    raw = journal.load(cfg.layout.parts, partition.paths, fp_id, partition.identities)
    pending = [r for r in range(len(partition)) if journal.needs_retry(raw.get(r), cfg.max_row_attempts)]
    return raw, {r: journal.as_published(res) for r, res in raw.items()}, pending


def publish(cfg: RunConfig, partition: Partition, fp: dict, overrides: dict[int, str] | None = None,
            faults=None, fence: LeaseFence | None = None) -> bool:
    """Publish the final output if every row has a final result; returns whether this call published.

    With ``skip_if_existing`` the write is conditional (first publisher wins); without it the output is
    replaced atomically (that is how a partition is recaptioned). Either way readers never see a partial object.
    With a ``fence``, the summary and the output are written only while the attempt holds the partition lease
    (:class:`LeaseLostError` otherwise).
    """
    raw, results, pending = final_results(cfg, partition, fp["id"])
    if pending:
        retry = [r for r in pending if r in results]
        log.info("not publishing: %d rows without a final result, %d of them to retry after transient errors "
                 "(first: %s)", len(pending), len(retry), pending[:5])
        return False
    for row, text in (overrides or {}).items():
        if results[row].status == STATUS_OK:
            results[row] = replace(results[row], text=text)
    body = partition_table.serialise(partition_table.merge_results(partition, results), cfg.output)
    if cfg.skip_if_existing and storage.exists(cfg.output):
        log.info("output already published by another rank or attempt: %s", cfg.output)
        return False
    with storage.retry_budget(fence.check() if fence is not None else None):
        summary = write_beside(cfg, fp, results, body)
    if faults is not None:
        faults.before_output()
    # the output write may retry only while the lease the fence just saw still runs (lease_fence)
    with storage.retry_budget(fence.check() if fence is not None else None):
        if cfg.skip_if_existing:
            published = storage.put_if_absent(cfg.output, body)
        else:
            storage.write_bytes(cfg.output, body)
            published = True
    if published:
        journal.compact(cfg.layout.parts, raw)
        log.info("published %s (%s, fingerprint %s); gallery beside it", cfg.output, journal.counts(results),
                 fp["id"])
    else:
        log.info("output already published by another rank or attempt: %s (summary %s)", cfg.output,
                 summary.get("rows"))
    return published


def write_beside(cfg: RunConfig, fp: dict, results: dict, body: bytes) -> dict:
    """Summary JSON and gallery for ``results`` and the output ``body`` made of them; written before the
    output, or rebuilt after it. The summary records the output's digest (``output_identity``)."""
    ranks = _load_rank_stats(cfg)
    per_row = stats.partition_tokens_per_row([res.tokens for res in results.values() if res.status == STATUS_OK])
    latest = stats.merge(stats.newest_per_rank(ranks))
    latest = {k: latest[k] for k in ("skipped", "rows_per_second", "model_busy", "attempt_output_tokens_per_row",
                                     "output_tokens_per_second_per_rank")}
    summary = {"output": cfg.output, "meta_path": cfg.meta_path, "model": cfg.model,
               **journal.counts(results), **latest,
               "output_tokens_per_row": per_row,  # kept: the same figure as partition_output_tokens_per_row
               "partition_output_tokens_per_row": per_row,
               SUMMARY_KEY: fp, output_identity.DIGEST_KEY: output_identity.digest(body), "ranks": ranks}
    storage.write_bytes(cfg.layout.summary, json.dumps(summary, indent=1).encode())
    rows = [gallery.GalleryRow(r, res.path, res.status, res.text, res.error, res.tokens, res.thumb)
            for r, res in sorted(results.items())]
    gallery.write_gallery(cfg.output, rows, summary, cfg.max_new_tokens)
    return summary


def rebuild_beside(cfg: RunConfig, fp: dict) -> bool:
    """After a skip: if summary or gallery is missing beside an existing output, rebuild them from the
    journal, but only if the journal under this fingerprint reproduces the output byte for byte (otherwise
    it is not the journal that made it). Returns whether anything was written."""
    if storage.exists(cfg.layout.gallery_index) and _summary_describes_output(cfg, fp):
        return False
    partition = partition_table.read_partition(cfg.meta_path)
    _, results, pending = final_results(cfg, partition, fp["id"])
    if pending:
        log.warning("summary or gallery missing beside %s, and the journal under fingerprint %s does not cover "
                    "every row (%d missing): not rebuilt", cfg.output, fp["id"], len(pending))
        return False
    body = partition_table.serialise(partition_table.merge_results(partition, results), cfg.output)
    if body != storage.read_bytes(cfg.output):
        log.warning("summary or gallery missing beside %s, but the output was not made from this journal under "
                    "fingerprint %s: not rebuilt", cfg.output, fp["id"])
        return False
    write_beside(cfg, fp, results, body)
    log.info("rebuilt summary and gallery beside %s from the journal", cfg.output)
    return True


def _summary(cfg: RunConfig) -> dict | None:
    try:
        summary = json.loads(storage.read_bytes(cfg.layout.summary))
    except Exception as err:
        if storage.is_not_found(err) or isinstance(err, ValueError):
            return None
        raise
    return summary if isinstance(summary, dict) else None


def _summary_describes_output(cfg: RunConfig, fp: dict) -> bool:
    """The summary beside the output exists, names ``fp`` and was written for the output's present bytes."""
    summary = _summary(cfg)
    return (summary is not None and (summary.get(SUMMARY_KEY) or {}).get("id") == fp["id"]
            and output_identity.describes(summary, storage.read_bytes(cfg.output)))


def interrupted_replacement(cfg: RunConfig, fp: dict) -> bool:
    """A replacement of the output under ``fp`` stopped between its summary and its output: the summary names
    ``fp`` but was written for other bytes than the output's. The output is then not made with ``fp``."""
    summary = _summary(cfg)
    return (summary is not None and (summary.get(SUMMARY_KEY) or {}).get("id") == fp["id"]
            and not output_identity.describes(summary, storage.read_bytes(cfg.output)))


def _load_rank_stats(cfg: RunConfig) -> list[dict]:
    return stats.load_records(storage.list_prefix(cfg.layout.stats), storage.read_bytes)
