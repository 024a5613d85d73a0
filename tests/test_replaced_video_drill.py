"""A video replaced in place (same key, other bytes) is captioned again, and only it (issue 25 #5).

Real SeaweedFS, real PostgreSQL, real decord, the real ``RankRunner`` with ColourCaptioner (it names each
clip's colour, so a caption says which bytes were read). Before, the registry's upsert did nothing for a
path it knew and nothing recorded the object's identity: a replaced video kept its old caption for good.
Now scrape records each object's ETag, a changed one re-queues the video into a new shard, and the ranks
check that the bytes they read are the ones the meta row names.
"""

from __future__ import annotations

import uuid

import pytest

from captioning_core import storage
from captioning_core.config import default_output
from captioning_core.faults import FaultPlan
from captioning_core.runner import RankRunner
from captioning_core.sharding import RankInfo
from curation import metadb, steps
from testkit.clips import ClipSpec, ensure_clip
from testkit.colour_captioner import ColourCaptioner, colour_config
from testkit.outputs import read_csv_from_s3

pytestmark = pytest.mark.integration

KEY = "2026-12-07"
MODEL = "colour"
SPECS = {"a.mp4": ClipSpec("red", "left"), "b.mp4": ClipSpec("green", "left"), "c.mp4": ClipSpec("blue", "left"),
         "d.mp4": ClipSpec("red", "right")}
NEW = ClipSpec("yellow", "up")  # what b.mp4 is replaced with


class World:
    """One partition's incoming videos on S3 and its registry in PostgreSQL; the DAG's steps over them."""

    def __init__(self, s3_server, pg_server, clip_dir) -> None:
        self.bucket = s3_server.create_bucket(f"replaced-{uuid.uuid4().hex[:8]}")
        self.s3 = s3_server.client()
        self.clip_dir = clip_dir
        dbname = f"replaced_{uuid.uuid4().hex[:8]}"
        pg_server.create_database(dbname)
        self.conn = pg_server.connect(dbname)
        metadb.apply_schema(self.conn)

    def uri(self, name: str) -> str:
        return f"s3://{self.bucket}/incoming/{KEY}/{name}"

    def upload(self, name: str, spec: ClipSpec) -> None:
        self.s3.upload_file(str(ensure_clip(spec, self.clip_dir)), self.bucket, f"incoming/{KEY}/{name}")

    def scrape_and_filter(self) -> list[str]:
        steps.scrape(self.s3, self.conn, self.bucket, f"incoming/{KEY}", KEY)
        shards = steps.filter_partition(self.s3, self.conn, KEY, steps.Thresholds(min_frames=2), self.bucket,
                                        "meta", shard_size=2)
        return [s["meta_path"] for s in shards]

    def caption(self, meta: str) -> dict:
        """What the caption task does for one shard (the ranks, in process); its result for write_back."""
        cfg = colour_config(meta)
        RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg), FaultPlan()).run()
        return {"output": default_output(meta, MODEL)}

    def write_back(self, shards: list[str]) -> None:
        steps.write_back(self.s3, self.conn, KEY, [{"output": default_output(s, MODEL)} for s in shards], MODEL,
                         [{"meta_path": s} for s in shards])

    def registry(self) -> dict[str, tuple]:
        with metadb.transaction(self.conn) as cur:
            cur.execute("SELECT path, text, caption_status, meta_uri, video_etag, captioned_at FROM video_meta "
                        "WHERE partition_key = %s", (KEY,))
            return {path: tuple(rest) for path, *rest in cur.fetchall()}

    def etag(self, name: str) -> str:
        return storage.etag_of(self.s3.head_object(Bucket=self.bucket, Key=f"incoming/{KEY}/{name}"))


@pytest.fixture
def world(s3_server, pg_server, tmp_path_factory, s3_env):
    w = World(s3_server, pg_server, tmp_path_factory.mktemp("replaced-clips"))
    yield w
    w.conn.close()


def _captions(world: World) -> dict[str, str]:
    return {path: row[0] for path, row in world.registry().items()}


def test_a_video_replaced_in_place_is_captioned_again_and_nothing_else_is(world):
    for name, spec in SPECS.items():
        world.upload(name, spec)
    first = world.scrape_and_filter()
    assert len(first) == 2
    for shard in first:
        world.caption(shard)
    world.write_back(first)
    assert _captions(world) == {world.uri(n): s.color for n, s in SPECS.items()}
    before = world.registry()
    outputs_before = {s: read_csv_from_s3(world.s3, default_output(s, MODEL))[1] for s in first}

    world.upload("b.mp4", NEW)  # replaced in place: same key, other bytes
    assert world.etag("b.mp4") != before[world.uri("b.mp4")][3]
    shards = world.scrape_and_filter()
    assert shards[:2] == first and len(shards) == 3  # the old shards stay as they are; b goes to a new one
    new_shard = shards[2]
    out, _ = read_csv_from_s3(world.s3, new_shard)
    assert out["path"].tolist() == [world.uri("b.mp4")] and out["video_etag"].tolist() == [world.etag("b.mp4")]
    row = world.registry()[world.uri("b.mp4")]
    assert row[:4] == (None, None, new_shard, world.etag("b.mp4"))  # old caption cleared, in the new shard

    ColourCaptioner.generate_calls = []
    for shard in shards:  # every shard's task runs; the old ones find their journal complete
        world.caption(shard)
    assert ColourCaptioner.generate_calls == [1]  # only the replaced video was captioned
    for shard in first:
        assert read_csv_from_s3(world.s3, default_output(shard, MODEL))[1] == outputs_before[shard]
    world.write_back(shards)

    after = world.registry()
    assert sorted(after) == sorted(before)  # no row lost or added
    assert _captions(world) == {**{world.uri(n): s.color for n, s in SPECS.items()}, world.uri("b.mp4"): "yellow"}
    assert {p: r for p, r in after.items() if p != world.uri("b.mp4")} == {
        p: r for p, r in before.items() if p != world.uri("b.mp4")}  # untouched, not even captioned_at
    manifest = steps.write_manifest(world.s3, world.conn, KEY, world.bucket, "manifests")
    assert manifest["rows"] == len(SPECS)

    # the same bytes uploaded again (a new LastModified, the same ETag) re-queue nothing
    world.upload("b.mp4", NEW)
    assert world.scrape_and_filter() == shards
    assert world.registry() == after


def test_a_video_replaced_between_filter_and_caption_fails_its_row_then_is_captioned_once(world):
    for name, spec in SPECS.items():
        world.upload(name, spec)
    shards = world.scrape_and_filter()
    world.upload("b.mp4", NEW)  # after filter named its ETag in the shard, before the ranks read it
    ColourCaptioner.generate_calls = []
    for shard in shards:
        world.caption(shard)
    assert sum(ColourCaptioner.generate_calls) == len(SPECS) - 1  # the changed video is not captioned
    world.write_back(shards)
    row = world.registry()[world.uri("b.mp4")]
    assert row[1] == "failed"  # not a caption of other bytes than the meta names
    out = _outputs(world, shards)
    assert out["video_etag"].tolist() == [world.registry()[p][3] for p in out["path"]]  # what each result is for

    again = world.scrape_and_filter()  # the registry sees the new ETag: b is re-queued
    assert again[:len(shards)] == shards and len(again) == len(shards) + 1
    ColourCaptioner.generate_calls = []
    for shard in again:
        world.caption(shard)
    assert ColourCaptioner.generate_calls == [1]
    world.write_back(again)
    assert _captions(world) == {**{world.uri(n): s.color for n, s in SPECS.items()}, world.uri("b.mp4"): "yellow"}
    assert world.registry()[world.uri("b.mp4")][1] == "ok"


def _outputs(world: World, shards: list[str]):
    import pandas as pd

    return pd.concat([read_csv_from_s3(world.s3, default_output(s, MODEL))[0] for s in shards], ignore_index=True)


def test_a_meta_rewritten_in_place_with_a_new_identity_recaptions_that_row_only(world):
    """Outside the DAG a meta may be rewritten in place (a user's pipeline): the existing output is then not
    finished for the rows whose ``video_etag`` changed (the ranks' ``--skip_if_existing`` and the operator
    share ``output_identity.changed_rows``), and only those rows are captioned again."""
    from captioning_core import cli, output_identity

    for name, spec in SPECS.items():
        world.upload(name, spec)
    shard = world.scrape_and_filter()[0]
    world.caption(shard)
    output = default_output(shard, MODEL)
    meta_table, meta_body = read_csv_from_s3(world.s3, shard)
    old_out, old_body = read_csv_from_s3(world.s3, output)
    assert output_identity.changed_rows(meta_body, old_body) == []
    cfg = colour_config(shard, skip_if_existing=True)
    assert not cli._videos_replaced(cfg)

    name = meta_table["path"][1].rsplit("/", 1)[1]
    world.upload(name, NEW)
    meta_table.loc[1, "video_etag"] = world.etag(name)
    bucket, key = storage.split(shard)
    world.s3.put_object(Bucket=bucket, Key=key, Body=meta_table.to_csv(index=False).encode())
    assert output_identity.changed_rows(world.s3.get_object(Bucket=bucket, Key=key)["Body"].read(), old_body) == [1]
    assert cli._videos_replaced(cfg)  # the ranks' skip does not take the old output for finished

    ColourCaptioner.generate_calls = []
    world.caption(shard)  # as the ranks run after _videos_replaced: the publish replaces the output
    assert ColourCaptioner.generate_calls == [1]  # row 0 came from the journal
    new_out, new_body = read_csv_from_s3(world.s3, output)
    assert new_out["text"].tolist() == [old_out["text"][0], "yellow"]
    assert new_out["video_etag"].tolist() == meta_table["video_etag"].tolist()
    assert not cli._videos_replaced(cfg)


def test_rows_registered_before_etags_adopt_theirs_unless_the_size_changed(world):
    """An upgrade does not recaption a partition: a row without a recorded ETag takes the listed one and keeps
    its caption when the size is unchanged; a row whose size changed too is re-queued."""
    for name, spec in SPECS.items():
        world.upload(name, spec)
    shards = world.scrape_and_filter()
    for shard in shards:
        world.caption(shard)
    world.write_back(shards)
    with metadb.transaction(world.conn) as cur:  # as rows registered before the column existed look
        cur.execute("UPDATE video_meta SET video_etag = NULL, video_modified = NULL")
        cur.execute("UPDATE video_meta SET size_bytes = size_bytes + 1 WHERE path = %s", (world.uri("c.mp4"),))
    before = world.registry()
    again = world.scrape_and_filter()
    after = world.registry()
    assert again[:len(shards)] == shards and len(again) == len(shards) + 1
    for name in SPECS:
        path = world.uri(name)
        assert after[path][3] == world.etag(name)
        if name == "c.mp4":
            assert after[path][:3] == (None, None, again[-1])
        else:
            assert after[path][:3] == before[path][:3] and after[path][4] == before[path][4]
