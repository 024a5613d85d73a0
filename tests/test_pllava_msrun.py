"""PLLaVA captioning of a real partition on SeaweedFS under real msrun with 2 CPU workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testkit.outputs import read_csv_from_s3
from testkit.partition import MIXED_BROKEN, upload_partition

pytestmark = [pytest.mark.integration, pytest.mark.msrun]

TINY_PLLAVA = Path(__file__).resolve().parents[1] / "tiny_models" / "pllava"
TINY_ARGS = ["--device_target", "CPU", "--pooling_shape", "4-4-4", "--max_new_tokens", "12", "--log_every", "0"]
OUTPUT = "meta_caption_pllava.csv"

# testkit's truncated file is a blue square moving up, cut to its first third. PLLaVA decodes only 4 frames, all
# before the cut, and whether decord's threaded decoder trips over the cut packet first is a race: the row fails
# with the decode error, or gets the caption of what its intact part shows.
TRUNCATED_CAPTION = "a blue square moves up"


def test_partition_on_s3_under_msrun(s3_server, s3_bucket, partition_clips, run_msrun, tmp_path):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "day=2026-11-22/part-0", partition_clips)
    result = run_msrun(meta, *TINY_ARGS, "--bs", "2", log_dir=tmp_path / "log", model_dir=TINY_PLLAVA,
                       script="caption_pllava.py")
    assert result.returncode == 0, result.tail
    out, _ = read_csv_from_s3(client, meta.replace("meta.csv", OUTPUT))
    assert out["path"].tolist() == [r.path for r in rows]
    assert out["aes"].tolist() == [f"{i / 7:.6f}" for i in range(len(rows))]  # pass-through untouched
    for row, (_, got) in zip(rows, out.iterrows(), strict=True):
        if row.spec is not None:
            assert (got["caption_status"], got["text"], got["caption_error"]) == ("ok", row.expected_caption, "")
        elif row.kind == "truncated" and got["caption_status"] == "ok":
            assert got["text"] == TRUNCATED_CAPTION
        else:
            assert got["caption_status"] == "failed" and got["text"] == "", row
            assert got["caption_error"], row
    summary = json.loads(client.get_object(Bucket=s3_bucket, Key=f"day=2026-11-22/part-0/{OUTPUT}.summary.json")[
        "Body"].read())
    assert summary["rows"] == len(rows) and summary["failed"] in (len(MIXED_BROKEN) - 1, len(MIXED_BROKEN))
    assert {s["rank"] for s in summary["ranks"]} == {0, 1}
    logs = result.rank_logs()
    for rank in (0, 1):
        assert any("no key unmatched" in line for line in logs[rank])
        assert any("64 video tokens per video" in line for line in logs[rank])
