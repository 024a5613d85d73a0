"""What the curation DAG's tasks do, outside Airflow: plain functions over an S3 client and a DB connection.

Every step is idempotent: registering a video twice changes nothing (unless its object was replaced in
place: another ETag or size makes it a new video at an old path, probed and sharded again), probing skips
videos already probed, a video keeps the meta shard it was first written to and new videos go to new shards (a shard's CSV never
changes, so its finished caption output is found and reused, and a partition that grows costs caption work
for its new videos only), captions are upserted only where something changed, and the manifest is only
rewritten when its bytes change.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass

from captioning_core import storage
from curation import metadb

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")
META_COLUMNS = ("path", "num_frames", "fps", "height", "width", "video_etag")
MANIFEST_COLUMNS = ("path", "text", "num_frames", "fps", "height", "width")


@dataclass(frozen=True)
class Thresholds:
    min_frames: int = 8
    min_fps: float = 5.0
    min_height: int = 64
    min_width: int = 64
    max_seconds: float = 3600.0
    # Caps that keep a shard's decode bounded: a tiny file can declare a huge picture or frame count, and the
    # ranks decode up to hundreds of frames at the stored size before resizing (issue 25 #2).
    max_pixels: int = 4096 * 2160  # per frame, as stored (DCI 4K)
    max_frames: int = 216_000  # an hour at 60 fps

    def verdict(self, num_frames: int, fps: float, height: int, width: int) -> str | None:
        """None to keep the video, else the reason it is dropped."""
        if height * width > self.max_pixels:
            return f"size {width}x{height} above max_pixels {self.max_pixels}"
        if num_frames > self.max_frames:
            return f"num_frames {num_frames} > max_frames {self.max_frames}"
        if num_frames < self.min_frames:
            return f"num_frames {num_frames} < {self.min_frames}"
        if fps < self.min_fps:
            return f"fps {fps:.2f} < {self.min_fps}"
        if height < self.min_height or width < self.min_width:
            return f"size {width}x{height} below {self.min_width}x{self.min_height}"
        if num_frames / fps > self.max_seconds:
            return f"duration {num_frames / fps:.0f}s > {self.max_seconds:.0f}s"
        return None


def _s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def scrape(s3, conn, bucket: str, prefix: str, partition_key: str) -> int:
    """Register every video under ``s3://bucket/prefix/`` into the partition with its identity (ETag, size,
    LastModified); a video whose ETag or size changed since it was registered is queued to be filtered and
    captioned again (sql/queries/register.sql). Returns how many videos it saw."""
    metadb.ensure_partition(conn, partition_key)
    rows = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            if obj["Key"].lower().endswith(VIDEO_EXTENSIONS):
                rows.append({"partition_key": partition_key, "path": _s3_uri(bucket, obj["Key"]),
                             "size_bytes": obj["Size"], "video_etag": storage.etag_of(obj),
                             "video_modified": obj.get("LastModified")})
    metadb.run_many(conn, "register", rows)
    log.info("partition %s: %d videos under s3://%s/%s", partition_key, len(rows), bucket, prefix)
    return len(rows)


def probe_video(s3, uri: str) -> tuple[int, float, int, int]:
    """(num_frames, fps, height, width) of an S3 video, read with decord from a temporary copy."""
    from captioning_core.video import probe

    bucket, key = storage.split(uri)
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        local = os.path.join(tmp, "video" + os.path.splitext(key)[1][:8])
        s3.download_file(bucket, key, local)
        info = probe(local)
    return info.num_frames, info.fps, info.height, info.width


def filter_partition(s3, conn, partition_key: str, thresholds: Thresholds, meta_bucket: str, meta_prefix: str,
                     shard_size: int, retry_failed: bool = False) -> list[dict]:
    """Probe new videos, record verdicts, put kept videos without a shard into new shards.

    A video keeps the shard it was first written to, so a shard's meta CSV never changes and its finished
    caption output stays valid: a partition that gains N videos costs caption work for those N only. With
    ``retry_failed`` the kept videos whose caption ended ``failed`` move to a new shard (and their old result
    is cleared); nothing else re-queues them.

    Returns ``[{"meta_path": uri}, ...]``, one per shard of the partition, for the mapped caption task.
    """
    for (path,) in metadb.run(conn, "select_unprobed", {"partition_key": partition_key}):
        try:
            num_frames, fps, height, width = probe_video(s3, path)
            reason = thresholds.verdict(num_frames, fps, height, width)
            status = "dropped" if reason else "kept"
        except Exception as err:  # unreadable videos are recorded, never fatal
            num_frames = fps = height = width = None
            status, reason = "unreadable", f"{type(err).__name__}: {err}"[:500]
        metadb.run(conn, "update_filter", {"partition_key": partition_key, "path": path, "num_frames": num_frames,
                                           "fps": fps, "height": height, "width": width,
                                           "filter_status": status, "filter_reason": reason})
    rows = [PartitionRow(*r) for r in metadb.run(conn, "select_partition", {"partition_key": partition_key})]
    kept = [r for r in rows if r.filter_status == "kept"]
    requeued = {r.path for r in kept if retry_failed and r.meta_uri and r.caption_status == "failed"}
    unassigned = sorted((r for r in kept if not r.meta_uri or r.path in requeued), key=lambda r: r.path)
    log.info("partition %s: %d videos, %d kept (%d without a shard, %d failed re-queued), %d dropped or "
             "unreadable", partition_key, len(rows), len(kept), len(unassigned) - len(requeued), len(requeued),
             len(rows) - len(kept))
    seq = 1 + max((_shard_seq(r.meta_uri) for r in rows if r.meta_uri), default=-1)
    new_uris = []
    for start in range(0, len(unassigned), shard_size):
        chunk = unassigned[start:start + shard_size]
        body = _meta_csv(chunk)
        # The name depends only on the DB state before this step and the shard's content: a retry after a
        # crash between the put and the DB update finds the same name and rewrites nothing.
        digest = hashlib.sha256(body).hexdigest()[:12]
        key = f"{meta_prefix.rstrip('/')}/{partition_key}/shard-{seq:04d}-{digest}/meta.csv"
        _put_if_changed(s3, meta_bucket, key, body)
        uri = _s3_uri(meta_bucket, key)
        metadb.run_many(conn, "assign_shard", [{"partition_key": partition_key, "path": r.path, "meta_uri": uri}
                                               for r in chunk])
        new_uris.append(uri)
        seq += 1
    kept_uris = {r.meta_uri for r in kept if r.meta_uri and r.path not in requeued} | set(new_uris)
    return [{"meta_path": uri} for uri in sorted(kept_uris, key=_shard_seq)]


@dataclass(frozen=True)
class PartitionRow:
    """One row of ``select_partition``."""

    path: str
    num_frames: int | None
    fps: float | None
    height: int | None
    width: int | None
    filter_status: str | None
    filter_reason: str | None
    meta_uri: str | None
    caption_status: str | None
    video_etag: str | None


_SHARD_SEQ = re.compile(r"/shard-(\d+)(?:-[0-9a-f]+)?/[^/]*$")


def _shard_seq(meta_uri: str) -> int:
    match = _SHARD_SEQ.search(meta_uri)
    return int(match.group(1)) if match else -1


def _meta_csv(rows: list[PartitionRow]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(META_COLUMNS)
    for r in rows:
        writer.writerow([r.path, r.num_frames, f"{r.fps:.6g}", r.height, r.width, r.video_etag or ""])
    return buf.getvalue().encode("utf-8")


def _put_if_changed(s3, bucket: str, key: str, body: bytes) -> bool:
    try:
        if s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body:
            return False
    except Exception as err:
        if not storage.is_not_found(err):
            raise
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    return True


def write_back(s3, conn, partition_key: str, caption_results: list[dict], model: str,
               shards: list[dict] | None = None) -> int:
    """Upsert every shard's captions into the table, in one transaction; returns the rows read.

    With ``shards`` (the filter step's list), a row is written only where the table still assigns the video
    to that shard: a video re-queued into a newer shard is never overwritten by its old shard's result.
    """
    import pandas as pd

    from captioning_core.config import default_output

    shard_of = {default_output(s["meta_path"], model): s["meta_path"] for s in shards or []}
    rows = []
    for result in caption_results:
        bucket, key = storage.split(result["output"])
        table = pd.read_csv(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()), dtype=str,
                            keep_default_na=False)
        meta_uri = shard_of.get(result["output"])
        for rec in table.to_dict("records"):
            rows.append({"partition_key": partition_key, "path": rec["path"], "text": rec.get("text", ""),
                         "caption_status": rec.get("caption_status") or None,
                         "caption_error": rec.get("caption_error") or None, "caption_model": model,
                         "meta_uri": meta_uri})
    metadb.run_many(conn, "upsert_captions", rows)
    return len(rows)


def write_manifest(s3, conn, partition_key: str, bucket: str, prefix: str) -> dict:
    """The training manifest of a partition on S3; returns its URI and row count."""
    rows = metadb.run(conn, "manifest", {"partition_key": partition_key})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for path, text, num_frames, fps, height, width in rows:
        writer.writerow([path, text, num_frames, f"{fps:.6g}", height, width])
    key = f"{prefix.rstrip('/')}/{partition_key}/train_manifest.csv"
    changed = _put_if_changed(s3, bucket, key, buf.getvalue().encode("utf-8"))
    return {"uri": _s3_uri(bucket, key), "rows": len(rows), "changed": changed, "partition_key": partition_key}


def thresholds_from_params(params: dict) -> Thresholds:
    fields = asdict(Thresholds())
    return Thresholds(**{k: type(v)(params[k]) for k, v in fields.items() if k in params})
