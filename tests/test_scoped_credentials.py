"""Ranks that may read only their partition: ``--allowed_root`` and S3 credentials scoped by prefix.

A SeaweedFS of its own (``weed mini`` on 127.0.0.1) with one more identity, ``rank``, that may read the
partition's videos (``incoming/<key>/``) and read and write its shard (``meta/<key>/<shard>/``: the meta CSV,
the output, its summary, gallery, journal and lease), as README "S3 credentials for the ranks" describes. The
real ``RankRunner`` runs with that identity (ColourCaptioner decodes each clip with decord, no VLM):

* with the DAG's allowed root, the shard is captioned and published, and rows that name another bucket,
  another partition, a local file or a ``..`` path fail as their own rows, final, before anything is read;
* without it, S3 itself refuses the scoped identity a foreign object (AccessDenied: the row is transient, the
  attempt is not published) but nothing stops a local file being read: only the allowed root does.
"""

from __future__ import annotations

import botocore.exceptions
import pytest

from captioning_core import storage
from captioning_core.runner import RankRunner
from captioning_core.sharding import RankInfo
from testkit.clips import ensure_clip
from testkit.colour_captioner import ColourCaptioner, colour_config
from testkit.demo_clips import PARTITION_SPECS
from testkit.outputs import read_output
from testkit.partition import Row, meta_csv
from testkit.s3server import SeaweedS3

pytestmark = pytest.mark.integration

BUCKET, OTHER_BUCKET = "curation", "other-bucket"
KEY, OTHER_KEY = "2026-11-20", "2026-11-19"
SHARD = f"meta/{KEY}/shard-0001-0123abcd"
VIDEOS = f"s3://{BUCKET}/incoming/{KEY}/"  # what video_curation passes as allowed_roots
RANK_ACTIONS = [f"Read:{BUCKET}/incoming/{KEY}/*", f"Read:{BUCKET}/{SHARD}/*", f"Write:{BUCKET}/{SHARD}/*",
                f"List:{BUCKET}"]


@pytest.fixture(scope="module")
def scoped_s3(tmp_path_factory):
    with SeaweedS3(data_dir=tmp_path_factory.mktemp("seaweed-scoped"), identities={"rank": RANK_ACTIONS}) as s3:
        admin = s3.client()
        for bucket in (BUCKET, OTHER_BUCKET):
            admin.create_bucket(Bucket=bucket)
        clips = tmp_path_factory.mktemp("scoped-clips")
        good = []
        for spec in PARTITION_SPECS[:3]:
            admin.upload_file(str(ensure_clip(spec, clips)), BUCKET, f"incoming/{KEY}/{spec.filename}")
            good.append(Row(f"{VIDEOS}{spec.filename}", spec))
        stranger = ensure_clip(PARTITION_SPECS[3], clips)  # a real video: only the root keeps it out
        admin.upload_file(str(stranger), OTHER_BUCKET, "private/x.mp4")
        admin.upload_file(str(stranger), BUCKET, f"incoming/{OTHER_KEY}/y.mp4")
        yield s3, good


@pytest.fixture
def as_rank(scoped_s3, monkeypatch):
    """This process's storage client with the scoped identity's credentials, as the operator passes them."""
    s3, _ = scoped_s3
    for k, v in s3.env("rank").items():
        monkeypatch.setenv(k, v)
    storage.s3_client.cache_clear()
    yield s3
    storage.s3_client.cache_clear()


def _put_meta(s3, name: str, rows: list[Row]) -> str:
    s3.client().put_object(Bucket=BUCKET, Key=f"{SHARD}/{name}", Body=meta_csv(rows))
    return f"s3://{BUCKET}/{SHARD}/{name}"


def test_the_identity_is_scoped(scoped_s3):
    """The premise: the rank identity reads its partition and nothing else, writes its shard and nothing else."""
    s3, good = scoped_s3
    env = s3.env("rank")
    import boto3

    rank = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    assert rank.get_object(Bucket=BUCKET, Key=good[0].path[len(f"s3://{BUCKET}/"):])["Body"].read()
    rank.put_object(Bucket=BUCKET, Key=f"{SHARD}/probe", Body=b"x")
    for call in (lambda: rank.get_object(Bucket=OTHER_BUCKET, Key="private/x.mp4"),
                 lambda: rank.get_object(Bucket=BUCKET, Key=f"incoming/{OTHER_KEY}/y.mp4"),
                 lambda: rank.put_object(Bucket=BUCKET, Key=f"incoming/{KEY}/planted.mp4", Body=b"x"),
                 lambda: rank.put_object(Bucket=BUCKET, Key=f"meta/{KEY}/shard-0002-ffff/out.csv", Body=b"x")):
        with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied|Forbidden|403"):
            call()


def test_a_scoped_rank_with_the_allowed_root_captions_its_shard_and_reads_nothing_else(scoped_s3, as_rank, tmp_path):
    s3, good = scoped_s3
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"AWS_SECRET_ACCESS_KEY=not-a-video\n")
    outside = [Row(f"s3://{OTHER_BUCKET}/private/x.mp4", None), Row(f"s3://{BUCKET}/incoming/{OTHER_KEY}/y.mp4", None),
               Row(str(secret), None), Row("/etc/passwd", None)]
    climbing = [Row("/data/videos/../../proc/self/environ", None),
                Row(f"{VIDEOS}../{OTHER_KEY}/y.mp4", None), Row(f"../../{OTHER_KEY}/y.mp4", None)]
    meta = _put_meta(s3, "meta.csv", good + outside + climbing)
    cfg = colour_config(meta, allowed_roots=[VIDEOS])
    stats = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()
    assert (stats.captioned, stats.failed, stats.transient) == (3, 7, 0), stats  # transient 0: S3 refused nothing
    out = read_output(s3.client(), cfg.output)  # published, by the scoped identity, into its own shard
    assert out["path"].tolist() == [r.path for r in good + outside + climbing]
    assert out["caption_status"].tolist() == ["ok"] * 3 + ["failed"] * 7
    assert out["text"].tolist()[:3] == [r.spec.color for r in good]
    errors = out["caption_error"].tolist()
    for error in errors[3:7]:
        assert "outside the allowed roots" in error and VIDEOS in error, error
    for error in errors[7:]:
        assert "'..' is not allowed" in error, error  # refused as written, never normalised into the root


def test_without_the_allowed_root_only_s3_scoping_stands_between_a_row_and_other_data(scoped_s3, as_rank, tmp_path):
    s3, good = scoped_s3
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"AWS_SECRET_ACCESS_KEY=not-a-video\n")
    rows = good[:2] + [Row(f"s3://{OTHER_BUCKET}/private/x.mp4", None), Row(str(secret), None)]
    meta = _put_meta(s3, "meta-unjailed.csv", rows)
    cfg = colour_config(meta, output=f"s3://{BUCKET}/{SHARD}/unjailed_caption_colour.csv", max_row_attempts=3)
    stats = RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()
    # the foreign object: S3 refuses the identity, an environment error, so the row is retried, not published
    assert (stats.captioned, stats.transient) == (2, 1), stats
    assert "AccessDenied" in stats.last_transient_error or "403" in stats.last_transient_error, stats
    assert not storage.exists(cfg.output)
    # the local file: nothing refused it; it was opened and decoded (and failed only for not being a video)
    assert stats.failed == 1
