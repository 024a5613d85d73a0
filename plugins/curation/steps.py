"""What the curation DAG's tasks do, outside Airflow: plain functions over an S3 client and a DB connection.

Every step is idempotent: registering a video twice changes nothing, probing skips videos already probed,
meta shards are named by their content (an unchanged shard keeps its name, so its finished caption output
is found and reused), captions are upserted, and the manifest is only rewritten when its bytes change.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import tempfile
from dataclasses import asdict, dataclass

from curation import metadb

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")
META_COLUMNS = ("path", "num_frames", "fps", "height", "width")
MANIFEST_COLUMNS = ("path", "text", "num_frames", "fps", "height", "width")


@dataclass(frozen=True)
class Thresholds:
    min_frames: int = 8
    min_fps: float = 5.0
    min_height: int = 64
    min_width: int = 64
    max_seconds: float = 3600.0

    def verdict(self, num_frames: int, fps: float, height: int, width: int) -> str | None:
        """None to keep the video, else the reason it is dropped."""
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


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def scrape(s3, conn, bucket: str, prefix: str, partition_key: str) -> int:
    """Register every video under ``s3://bucket/prefix/`` into the partition; returns how many it saw."""
    metadb.ensure_partition(conn, partition_key)
    rows = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            if obj["Key"].lower().endswith(VIDEO_EXTENSIONS):
                rows.append({"partition_key": partition_key, "path": _s3_uri(bucket, obj["Key"]),
                             "size_bytes": obj["Size"]})
    metadb.run_many(conn, "register", rows)
    log.info("partition %s: %d videos under s3://%s/%s", partition_key, len(rows), bucket, prefix)
    return len(rows)


def probe_video(s3, uri: str) -> tuple[int, float, int, int]:
    """(num_frames, fps, height, width) of an S3 video, read with decord from a temporary copy."""
    from captioning_core.video import probe

    bucket, key = _split(uri)
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        local = os.path.join(tmp, "video" + os.path.splitext(key)[1][:8])
        s3.download_file(bucket, key, local)
        info = probe(local)
    return info.num_frames, info.fps, info.height, info.width


def filter_partition(s3, conn, partition_key: str, thresholds: Thresholds, meta_bucket: str, meta_prefix: str,
                     shard_size: int) -> list[dict]:
    """Probe new videos, record verdicts, and write the kept ones as meta shards.

    Returns ``[{"meta_path": uri}, ...]``, one per shard, for the mapped caption task.
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
    rows = metadb.run(conn, "select_partition", {"partition_key": partition_key})
    kept = [r for r in rows if r[5] == "kept"]
    log.info("partition %s: %d videos, %d kept, %d dropped or unreadable", partition_key, len(rows), len(kept),
             len(rows) - len(kept))
    shards = []
    for start in range(0, len(kept), shard_size):
        chunk = kept[start:start + shard_size]
        body = _meta_csv(chunk)
        digest = hashlib.sha256(body).hexdigest()[:12]
        key = f"{meta_prefix.rstrip('/')}/{partition_key}/shard-{start // shard_size:04d}-{digest}/meta.csv"
        _put_if_changed(s3, meta_bucket, key, body)
        uri = _s3_uri(meta_bucket, key)
        metadb.run_many(conn, "set_meta_uri", [{"partition_key": partition_key, "path": r[0], "meta_uri": uri}
                                               for r in chunk])
        shards.append({"meta_path": uri})
    return shards


def _meta_csv(rows: list[tuple]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(META_COLUMNS)
    for path, num_frames, fps, height, width, *_ in rows:
        writer.writerow([path, num_frames, f"{fps:.6g}", height, width])
    return buf.getvalue().encode("utf-8")


def _put_if_changed(s3, bucket: str, key: str, body: bytes) -> bool:
    try:
        if s3.get_object(Bucket=bucket, Key=key)["Body"].read() == body:
            return False
    except Exception as err:
        if str(getattr(err, "response", {}).get("Error", {}).get("Code")) not in ("NoSuchKey", "404"):
            raise
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    return True


def write_back(s3, conn, partition_key: str, caption_results: list[dict], model: str) -> int:
    """Upsert every shard's captions into the table, in one transaction; returns the rows written."""
    import pandas as pd

    rows = []
    for result in caption_results:
        bucket, key = _split(result["output"])
        table = pd.read_csv(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()), dtype=str,
                            keep_default_na=False)
        for rec in table.to_dict("records"):
            rows.append({"partition_key": partition_key, "path": rec["path"], "text": rec.get("text", ""),
                         "caption_status": rec.get("caption_status") or None,
                         "caption_error": rec.get("caption_error") or None, "caption_model": model})
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
