"""The gallery view serves the objects of an output with a custom name, and still nothing else.

The operator's ``output_uri`` may name any object (here ``.../captions.csv``, without the seed's ``_caption_``
mark). The view used to refuse such an output's own links (it checked the key's name); it decides by the output
the task instance recorded (``PartitionLayout.serves``). Driven for real: ``airflow dags test`` captions a small
partition with the tiny model through msrun and records the operator's extra links, then the API server alone
(on the same metadata DB, the simple auth manager's login) serves the view the links point at.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from captioning_core.layout import PartitionLayout
from testkit.airflow_env import TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.airflow_services import AirflowServices
from testkit.clips import ensure_clip
from testkit.demo_clips import PARTITION_SPECS
from testkit.partition import upload_partition

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]

DAGS = Path(__file__).resolve().parent / "airflow_dags"
REFUSED = "not a caption gallery object of this task instance"


def test_a_custom_named_output_gets_its_gallery_and_output_but_not_its_journal_or_lease(s3_server, s3_bucket,
                                                                                        tmp_path):
    client = s3_server.client()
    clips = [(ensure_clip(spec, tmp_path / "clips"), spec, "good") for spec in PARTITION_SPECS[:2]]
    meta, rows = upload_partition(client, s3_bucket, "custom", clips)
    output = meta.replace("meta.csv", "captions.csv")
    env = AirflowEnv(tmp_path / "airflow", s3_server.env(), "postgresql://unused", dags_folder=DAGS)
    env.migrate()
    proc = env.dags_test("caption_drill", "2026-11-26", {"meta_path": meta, "output_uri": output,
                                                         "caption_options": dict(TINY_CAPTION_OPTIONS)})
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    (run_id,) = {run for run, _, _ in env.task_results("caption_drill", "caption")}

    layout = PartitionLayout(output.split(f"s3://{s3_bucket}/", 1)[1])
    thumbs = client.list_objects_v2(Bucket=s3_bucket, Prefix=layout.gallery + "thumbs/").get("Contents", [])
    parts = client.list_objects_v2(Bucket=s3_bucket, Prefix=layout.parts).get("Contents", [])
    assert thumbs and parts
    client.put_object(Bucket=s3_bucket, Key=layout.lease, Body=b"{}")  # a lease present while the view is asked

    with AirflowServices(env, components=("api-server",), users={"admin": "admin"}) as af:
        quoted = urllib.parse.quote(run_id, safe="")
        links = af.api("GET", f"/api/v2/dags/caption_drill/dagRuns/{quoted}/taskInstances/caption/links")
        links = links["extra_links"]
        base = f"/caption-gallery/caption_drill/{quoted}/caption/-1/caption_s3/{s3_bucket}/"
        assert links["Caption output"] == base + urllib.parse.quote(layout.output)
        assert links["Caption gallery"] == base + urllib.parse.quote(layout.gallery_index)
        admin = af.token("admin")

        def get(key: str) -> tuple[int, object]:
            status, body, _ = af.request("GET", base + urllib.parse.quote(key), token=admin)
            return status, body

        status, page = get(layout.gallery_index)
        assert status == 200 and all(r.expected_caption in page.decode() for r in rows)
        status, thumb = get(thumbs[0]["Key"])
        assert status == 200 and thumb[:2] == b"\xff\xd8"  # a JPEG
        status, csv = get(layout.output)
        assert status == 200 and all(r.path in csv.decode() for r in rows)
        status, summary = get(layout.summary)
        assert status == 200 and summary["captioned"] == len(rows)
        for key in (parts[0]["Key"], layout.lease):  # they exist, and are still refused
            status, body = get(key)
            assert status == 404 and body["detail"] == REFUSED, (key, body)
