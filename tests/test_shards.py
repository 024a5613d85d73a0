"""Stable, incremental meta shards (real PostgreSQL, real SeaweedFS, real encoded clips probed with decord).

A video keeps the shard it was first written to; new videos go to new shards; failed captions are re-queued
only when asked; a shard's old result never overwrites the result of the shard a video moved to.
"""

from __future__ import annotations

import csv
import hashlib
import io
import uuid

import pytest

from captioning_core.config import default_output
from curation import metadb, steps
from testkit.clips import ClipSpec, ensure_clip

pytestmark = pytest.mark.integration

KEY = "2026-12-02"
SPECS = [ClipSpec(c, d) for c in ("red", "green", "blue") for d in ("left", "right")]
LATE = ClipSpec("yellow", "up")


class Partition:
    def __init__(self, s3_server, pg_server, clip_dir) -> None:
        self.bucket = s3_server.create_bucket(f"shards-{uuid.uuid4().hex[:8]}")
        self.s3 = s3_server.client()
        self.clip_dir = clip_dir
        dbname = f"shards_{uuid.uuid4().hex[:8]}"
        pg_server.create_database(dbname)
        self.conn = pg_server.connect(dbname)
        metadb.apply_schema(self.conn)

    def upload(self, spec: ClipSpec, name: str | None = None) -> str:
        key = f"incoming/{KEY}/{name or spec.filename}"
        self.s3.upload_file(str(ensure_clip(spec, self.clip_dir)), self.bucket, key)
        return f"s3://{self.bucket}/{key}"

    def scrape_and_filter(self, shard_size: int = 2, retry_failed: bool = False,
                          thresholds: steps.Thresholds | None = None) -> list[str]:
        steps.scrape(self.s3, self.conn, self.bucket, f"incoming/{KEY}", KEY)
        shards = steps.filter_partition(self.s3, self.conn, KEY, thresholds or steps.Thresholds(min_frames=2),
                                        self.bucket, "meta", shard_size, retry_failed)
        return [s["meta_path"] for s in shards]

    def shard_paths(self, meta_uri: str) -> list[str]:
        bucket, key = meta_uri[5:].split("/", 1)
        body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        return [r["path"] for r in csv.DictReader(io.StringIO(body))]

    def objects(self) -> dict[str, tuple]:
        out = {}
        for obj in self.s3.list_objects_v2(Bucket=self.bucket).get("Contents", []):
            body = self.s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = (obj["LastModified"], hashlib.sha256(body).hexdigest())
        return out

    def table(self) -> dict[str, tuple]:
        with metadb.transaction(self.conn) as cur:
            cur.execute("SELECT path, meta_uri, caption_status, text FROM video_meta WHERE partition_key = %s",
                        (KEY,))
            return {path: rest for path, *rest in cur.fetchall()}

    def write_output(self, meta_uri: str, captions: dict[str, tuple[str, str]]) -> dict:
        """What the caption task would publish for a shard: its rows plus text and status."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "text", "caption_status", "caption_error"])
        for path in self.shard_paths(meta_uri):
            text, status = captions[path]
            writer.writerow([path, text, status, "" if status == "ok" else "VideoError: test"])
        output = default_output(meta_uri, "qwen2vl")
        bucket, key = output[5:].split("/", 1)
        self.s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue().encode())
        return {"output": output}


@pytest.fixture
def partition(s3_server, pg_server, tmp_path_factory):
    p = Partition(s3_server, pg_server, tmp_path_factory.mktemp("shard-clips"))
    yield p
    p.conn.close()


def test_a_late_video_gets_a_new_shard_and_no_old_shard_changes(partition):
    paths = [partition.upload(spec) for spec in SPECS]
    first = partition.scrape_and_filter(shard_size=2)
    assert len(first) == 3
    assert sorted(p for shard in first for p in partition.shard_paths(shard)) == sorted(paths)
    before = partition.objects()

    again = partition.scrape_and_filter(shard_size=2)  # nothing new: same shards, nothing written
    assert again == first
    assert partition.objects() == before

    # A video whose name sorts before every other one: under content-named consecutive chunks it would have
    # renamed every shard; here it gets a shard of its own.
    late = partition.upload(LATE, name="000-late.mp4")
    third = partition.scrape_and_filter(shard_size=2)
    assert third[:3] == first
    assert len(third) == 4 and partition.shard_paths(third[3]) == [late]
    after = partition.objects()
    assert {k: v for k, v in after.items() if k in before} == before  # byte-identical, never rewritten
    assert sorted(set(after) - set(before)) == [f"incoming/{KEY}/000-late.mp4", third[3].split("/", 3)[3]]


def test_failed_rows_are_requeued_only_when_asked_and_old_results_never_win(partition):
    for spec in SPECS[:4]:
        partition.upload(spec)
    shards = partition.scrape_and_filter(shard_size=2)
    results, captions = [], {}
    for shard in shards:
        for i, path in enumerate(partition.shard_paths(shard)):
            captions[path] = ("", "failed") if i == 0 else (f"caption of {path}", "ok")
        results.append(partition.write_output(shard, captions))
    steps.write_back(partition.s3, partition.conn, KEY, results, "qwen2vl", [{"meta_path": s} for s in shards])
    failed = sorted(p for p, (_, status) in captions.items() if status == "failed")
    assert sorted(p for p, row in partition.table().items() if row[1] == "failed") == failed

    assert partition.scrape_and_filter(shard_size=2) == shards  # not asked: nothing re-queued
    requeued = partition.scrape_and_filter(shard_size=2, retry_failed=True)
    assert requeued[:len(shards)] == shards and len(requeued) == len(shards) + 1
    retry_shard = requeued[-1]
    assert partition.shard_paths(retry_shard) == failed
    table = partition.table()
    assert all(table[p][0] == retry_shard and table[p][1] is None for p in failed)  # old result cleared
    # Asking again (a retry of the filter task) re-queues nothing more: the rows are waiting in their shard.
    assert partition.scrape_and_filter(shard_size=2, retry_failed=True) == requeued

    for path in failed:
        captions[path] = (f"second try of {path}", "ok")
    results.append(partition.write_output(retry_shard, captions))
    all_shards = [{"meta_path": s} for s in requeued]
    # The old shards' outputs still say "failed" for these rows and are written back too, in either order.
    steps.write_back(partition.s3, partition.conn, KEY, list(reversed(results)), "qwen2vl", all_shards)
    steps.write_back(partition.s3, partition.conn, KEY, results, "qwen2vl", all_shards)
    table = partition.table()
    assert {p: (row[1], row[2]) for p, row in table.items()} == {p: (s, t) for p, (t, s) in captions.items()}


def test_the_filter_drops_videos_over_the_pixel_and_frame_caps_with_a_reason(partition):
    """A shard's decode stays bounded: videos whose stored picture or frame count is over the caps never
    reach a meta shard, and their row says why (issue 25 #2)."""
    big = partition.upload(ClipSpec("red", "left", width=640, height=480), name="big.mp4")
    long = partition.upload(ClipSpec("green", "left", seconds=4.0), name="long.mp4")
    fine = partition.upload(ClipSpec("blue", "left"), name="fine.mp4")
    caps = steps.Thresholds(min_frames=2, max_pixels=320 * 240, max_frames=60)  # 4 s at 25 fps = 100 frames
    shards = partition.scrape_and_filter(shard_size=10, thresholds=caps)
    assert [p for shard in shards for p in partition.shard_paths(shard)] == [fine]
    with metadb.transaction(partition.conn) as cur:
        cur.execute("SELECT path, filter_status, filter_reason FROM video_meta WHERE partition_key = %s", (KEY,))
        verdicts = {path: (status, reason) for path, status, reason in cur.fetchall()}
    assert verdicts[big] == ("dropped", "size 640x480 above max_pixels 76800")
    assert verdicts[long] == ("dropped", "num_frames 100 > max_frames 60")
    assert verdicts[fine] == ("kept", None)
