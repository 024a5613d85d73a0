"""A recaption in progress never touches what the published gallery shows (issue 25 #15), on real S3 and decord.

Ranks write each row's thumbnail strip as they go, before anything is published. They used to write them at
``thumbs/<row>.jpg``, the very objects the published gallery links, so a recaption running with new settings
rewrote the old gallery's pictures under its old captions. Thumbnails now go under the fingerprint of the
settings they were made with.
"""

from __future__ import annotations

import re
import time

import pytest

from captioning_core.runner import RankRunner
from captioning_core.sharding import RankInfo
from testkit.clips import ensure_clip
from testkit.colour_captioner import ColourCaptioner, colour_config
from testkit.demo_clips import PARTITION_SPECS
from testkit.partition import upload_partition

pytestmark = pytest.mark.integration


def _linked_thumbs(client, bucket: str, gallery: str) -> dict[str, tuple]:
    """Each thumbnail the gallery's index links -> (LastModified, ETag) of its object."""
    index = client.get_object(Bucket=bucket, Key=gallery + "index.html")["Body"].read().decode()
    links = re.findall(r'<img loading="lazy" src="([^"]+)"', index)
    assert links
    heads = {link: client.head_object(Bucket=bucket, Key=gallery + link) for link in links}
    return {link: (h["LastModified"], h["ETag"]) for link, h in heads.items()}


def test_a_running_recaption_leaves_the_published_gallery_alone(s3_server, s3_bucket, s3_env, tmp_path):
    client = s3_server.client()
    clips = [(ensure_clip(spec, tmp_path), spec, "good") for spec in PARTITION_SPECS[:6]]
    meta, rows = upload_partition(client, s3_bucket, "thumbs", clips)
    cfg = colour_config(meta)
    RankRunner(cfg, RankInfo(0, 1), ColourCaptioner(cfg)).run()
    gallery = cfg.layout.gallery[len(f"s3://{s3_bucket}/"):]
    index = client.get_object(Bucket=s3_bucket, Key=gallery + "index.html")["Body"].read()
    before = _linked_thumbs(client, s3_bucket, gallery)
    assert len(before) == len(rows)  # one strip per video

    time.sleep(1.1)  # S3's Last-Modified has one-second resolution: a rewrite must show
    recaption = colour_config(meta, max_new_tokens=5)  # new settings, a new fingerprint
    # rank 0 of 2 captions its rows (writing their thumbnails); rank 1 has not run, so nothing is published
    RankRunner(recaption, RankInfo(0, 2), ColourCaptioner(recaption)).run()
    assert client.get_object(Bucket=s3_bucket, Key=gallery + "index.html")["Body"].read() == index
    assert _linked_thumbs(client, s3_bucket, gallery) == before

    RankRunner(recaption, RankInfo(1, 2), ColourCaptioner(recaption)).run()  # the recaption finishes
    after = _linked_thumbs(client, s3_bucket, gallery)
    assert len(after) == len(rows) and set(after).isdisjoint(before)  # the new gallery links its own strips
