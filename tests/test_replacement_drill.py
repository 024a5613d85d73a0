"""A replacement (recaption with new settings) that dies mid-publish is finished by the next attempt, never
taken for done (issue 25 #1): Qwen2-VL under real msrun (2 CPU workers) on SeaweedFS.

The publish writes the summary (new fingerprint) and gallery, then the output. A rank SIGKILLed between the
two (``crash_publish``) leaves the old output beside a summary naming the new settings. Before, the next
``--skip_if_existing`` attempt with the new settings saw an output and skipped: the old captions stayed
"current" for good. Now the summary records the digest of the output it was written for, and the attempt
finishes the replacement from the journal, loading no model.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from captioning_core import arguments
from testkit.outputs import read_csv_from_s3
from testkit.partition import upload_partition
from testkit.paths import TINY_QWEN2VL
from testkit.profile import TINY_ARGS

pytestmark = [pytest.mark.integration, pytest.mark.msrun]
OUT = "meta_caption_qwen2vl.csv"
SHORT = ["--max_new_tokens", "3"]  # the new settings: a changed generation option, visibly shorter captions


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from testkit.clips import ensure_clip
    from testkit.demo_clips import PARTITION_SPECS

    directory = tmp_path_factory.mktemp("replacement-clips")
    return [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS[:4]]


def _summary(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_a_replacement_killed_between_summary_and_output_is_finished_by_the_next_attempt(
        s3_server, s3_bucket, clips, run_msrun, tmp_path):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "replace", clips)
    output, summary_key = meta.replace("meta.csv", OUT), f"replace/{OUT}.summary.json"
    new_fp = arguments.for_script_args("qwen2vl", [meta, "--pretrained_model_name_or_path", str(TINY_QWEN2VL),
                                                     *TINY_ARGS, *SHORT])["id"]

    first = run_msrun(meta, *TINY_ARGS, "--skip_if_existing", log_dir=tmp_path / "log1")
    assert first.returncode == 0, first.tail
    old, old_body = read_csv_from_s3(client, output)

    # the replacement (no --skip_if_existing, as the operator runs a recaption) dies before its output PUT
    crashed = run_msrun(meta, *TINY_ARGS, *SHORT, log_dir=tmp_path / "log2",
                        env={"CAPTION_FAULTS": "crash_publish@*/try1", "AIRFLOW_CTX_TRY_NUMBER": "1"})
    assert crashed.returncode != 0
    assert read_csv_from_s3(client, output)[1] == old_body  # the old output is still there ...
    assert _summary(client, s3_bucket, summary_key)["fingerprint"]["id"] == new_fp  # ... under the new summary

    # the next attempt with the new settings, skip flag on: finishes the replacement instead of skipping
    retry = run_msrun(meta, *TINY_ARGS, *SHORT, "--skip_if_existing", log_dir=tmp_path / "log3",
                      env={"AIRFLOW_CTX_TRY_NUMBER": "2"})
    assert retry.returncode == 0, retry.tail
    logs = [line for lines in retry.rank_logs().values() for line in lines]
    assert any("finishing that replacement" in line for line in logs)
    assert not any("loaded " in line for line in logs)  # every row was journaled under the new settings
    new, new_body = read_csv_from_s3(client, output)
    assert new["path"].tolist() == old["path"].tolist() == [r.path for r in rows]
    assert set(new["caption_status"]) == {"ok"}
    assert new["text"].tolist() != old["text"].tolist()
    assert all(len(n.split()) < len(o.split()) for n, o in zip(new["text"], old["text"], strict=True))
    summary = _summary(client, s3_bucket, summary_key)
    assert summary["fingerprint"]["id"] == new_fp
    assert summary["output_sha256"] == hashlib.sha256(new_body).hexdigest()

    # and once finished, the same attempt again is a plain skip
    again = run_msrun(meta, *TINY_ARGS, *SHORT, "--skip_if_existing", log_dir=tmp_path / "log4")
    assert again.returncode == 0, again.tail
    assert any("output exists, skipping" in line for lines in again.rank_logs().values() for line in lines)
    assert read_csv_from_s3(client, output)[1] == new_body
