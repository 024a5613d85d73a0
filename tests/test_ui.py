"""The Airflow UI for real: api-server, scheduler and dag-processor on 127.0.0.1 run the curation DAG, then
headless Chromium renders the DAG run's grid and the caption gallery behind the operator's extra link."""

from __future__ import annotations

import urllib.parse
import uuid

import pytest

from curation import metadb
from testkit import browser
from testkit.airflow_env import TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.airflow_services import AirflowServices
from testkit.clips import ensure_clip
from testkit.demo_clips import DAG_SPECS

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]
KEY = "2026-11-19"


def test_dag_run_in_the_ui_and_gallery_link(s3_server, pg_server, tmp_path_factory, tmp_path):
    bucket = s3_server.create_bucket(f"curation-ui-{uuid.uuid4().hex[:6]}")
    client = s3_server.client()
    clip_dir = tmp_path_factory.mktemp("ui-clips")
    captions = set()
    for spec in DAG_SPECS[:3]:
        client.upload_file(str(ensure_clip(spec, clip_dir)), bucket, f"incoming/{KEY}/{spec.filename}")
        captions.add(spec.caption)
    suffix = uuid.uuid4().hex[:6]
    pg_server.create_database(f"curation_{suffix}")
    pg_server.create_database(f"airflow_{suffix}")
    conn = pg_server.connect(f"curation_{suffix}")
    metadb.apply_schema(conn)
    conn.close()
    env = AirflowEnv(tmp_path_factory.mktemp("airflow-ui"), s3_server.env(), pg_server.uri_for(f"curation_{suffix}"))
    with AirflowServices(env, pg_server.uri_for(f"airflow_{suffix}")) as af:
        af.wait_for_dag("video_curation")
        run_id = af.trigger("video_curation", f"{KEY}T00:00:00Z",
                            {"bucket": bucket, "shard_size": 10, "caption_options": TINY_CAPTION_OPTIONS})
        state = af.wait_for_run("video_curation", run_id)
        assert state == "success", af.tail("scheduler", 80)

        quoted = urllib.parse.quote(run_id, safe="")
        links = af.api("GET", f"/api/v2/dags/video_curation/dagRuns/{quoted}/taskInstances/caption/links?map_index=0")
        link = links["extra_links"]["Caption gallery"]
        assert link.startswith("/caption-gallery/caption_s3/")
        page = af.api("GET", link).decode()
        assert all(c in page for c in captions)

        dom = browser.dump_dom(af.base_url + link)
        assert all(c in dom for c in captions) and dom.count("<img") == 3
        browser.screenshot(af.base_url + link, tmp_path / "gallery.png")
        grid_url = f"{af.base_url}/dags/video_curation/runs/{quoted}"
        grid = browser.dump_dom(grid_url, wait_ms=25000)
        assert "video_curation" in grid and "caption" in grid and "scrape" in grid
        browser.screenshot(grid_url, tmp_path / "grid.png", wait_ms=25000)
        assert (tmp_path / "grid.png").stat().st_size > 10_000
