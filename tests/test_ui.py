"""The Airflow UI for real, with the simple auth manager's users (not all-admins): api-server, scheduler and
dag-processor on 127.0.0.1 (LocalExecutor, so tasks run under the real supervisor with heartbeats).

- The curation DAG runs; the caption gallery behind the operator's extra link answers 401 to anonymous
  requests, 403 to a user without access, and opens for a logged-in admin in headless Chromium (the UI's
  session cookie), thumbnails included; HTML planted in the bucket never runs (CSP sandbox, nosniff).
- A caption task marked failed through the REST API while msrun runs: the supervisor's heartbeat kills it,
  the ranks stop gracefully, no process is left, the task's error says it was killed, and the cleared task's
  next try resumes from the journal with nothing lost or duplicated.
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
import urllib.parse
import uuid

import psutil
import pytest

from curation import metadb
from testkit import browser
from testkit.airflow_env import REPO, TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.airflow_services import AirflowServices
from testkit.clips import ensure_clip
from testkit.demo_clips import DAG_SPECS, PARTITION_SPECS
from testkit.partition import upload_partition
from testkit.process import caption_processes, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]
KEY = "2026-11-19"
USERS = {"admin": "admin", "viewer": "viewer", "nobody": ""}  # "nobody" logs in but has no role
CSP = "content-security-policy"
# video_curation's shards are named at run time by its filter task, so its galleries are served only under
# prefixes the API server's configuration names (caption_gallery_scope)
BUCKET = f"curation-ui-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def ui(s3_server, pg_server, tmp_path_factory):
    """One deployment for the module: the production DAGs plus the drill DAG, users with passwords."""
    dags = tmp_path_factory.mktemp("ui-dags")
    for src in [*(REPO / "dags").glob("*.py"), REPO / "tests" / "airflow_dags" / "caption_drill.py"]:
        shutil.copy(src, dags / src.name)
    suffix = uuid.uuid4().hex[:6]
    pg_server.create_database(f"curation_{suffix}")
    pg_server.create_database(f"airflow_{suffix}")
    conn = pg_server.connect(f"curation_{suffix}")
    metadb.apply_schema(conn)
    conn.close()
    # faults reach only the drill DAG (allow_fault_injection=True); the production operator drops them
    env = AirflowEnv(tmp_path_factory.mktemp("airflow-ui"), s3_server.env(), pg_server.uri_for(f"curation_{suffix}"),
                     dags_folder=dags, extra={"CAPTION_FAULTS": "slow@0:1/try1,slow@1:1/try1",
                                               "AIRFLOW__CAPTION_GALLERY__OUTPUT_PREFIXES":
                                                   json.dumps({"video_curation": [f"s3://{BUCKET}/meta/"]})})
    with AirflowServices(env, pg_server.uri_for(f"airflow_{suffix}"), users=USERS) as af:
        af.wait_for_dag("video_curation")
        af.wait_for_dag("caption_drill")
        yield af


class _Canary:
    """A 127.0.0.1 HTTP server that records every request (a planted script would call it)."""

    def __enter__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_gallery_is_behind_the_airflow_login_and_never_runs_planted_html(ui, s3_server, tmp_path_factory, tmp_path,
                                                                      broken_clips):
    af = ui
    bucket = s3_server.create_bucket(BUCKET)
    client = s3_server.client()
    clip_dir = tmp_path_factory.mktemp("ui-clips")
    captions = set()
    for spec in DAG_SPECS[:3]:
        client.upload_file(str(ensure_clip(spec, clip_dir)), bucket, f"incoming/{KEY}/{spec.filename}")
        captions.add(spec.caption)
    client.upload_file(str(broken_clips["truncated"]), bucket, f"incoming/{KEY}/truncated.mp4")  # a failed row
    started = time.monotonic()
    run_id = af.trigger("video_curation", f"{KEY}T00:00:00Z",
                        {"bucket": bucket, "shard_size": 10, "caption_options": TINY_CAPTION_OPTIONS})
    state = af.wait_for_run("video_curation", run_id)
    wall = time.monotonic() - started
    assert state == "success", af.tail("scheduler", 80)

    quoted = urllib.parse.quote(run_id, safe="")
    _check_what_the_ui_shows(af, quoted, wall)
    links = af.api("GET", f"/api/v2/dags/video_curation/dagRuns/{quoted}/taskInstances/caption/links?map_index=0")
    link = links["extra_links"]["Caption gallery"]
    assert link.startswith(f"/caption-gallery/video_curation/{quoted}/caption/0/caption_s3/{bucket}/")

    # curl's view: anonymous 401, no role 403 (as Airflow's own API answers that user), viewer and admin 200
    status, _, headers = af.request("GET", link)
    assert status == 401 and headers[CSP].startswith("sandbox") and headers["x-content-type-options"] == "nosniff"
    nobody = af.token("nobody")
    assert af.request("GET", link, token=nobody)[0] == 403
    assert af.request("GET", "/api/v2/dags/video_curation", token=nobody)[0] == 403
    for user in ("viewer", "admin"):
        status, page, headers = af.request("GET", link, cookie=af.token(user))
        assert status == 200 and all(c in page.decode() for c in captions)
        assert headers[CSP].startswith("sandbox allow-same-origin;") and "img-src 'self'" in headers[CSP]
        assert "allow-scripts" not in headers[CSP] and "default-src 'none'" in headers[CSP]
        assert "script-src" not in headers[CSP] and headers["x-content-type-options"] == "nosniff"
    # the object is served only under the task instance that recorded it
    other = link.replace(f"/{quoted}/", "/" + urllib.parse.quote("manual__2000-01-01T00:00:00+00:00", safe="") + "/")
    assert af.request("GET", other, token=af.token("admin"))[0] == 404
    assert af.request("GET", link.replace("/index.html", "/../../meta.csv"), token=af.token("admin"))[0] == 404

    # Chromium as a logged-in admin (the UI's cookie): the gallery with its thumbnails
    admin_cookie = {"_token": af.token("admin")}
    seen = browser.visit(af.base_url + link, cookies=admin_cookie, screenshot=tmp_path / "gallery.png")
    assert all(c in seen["html"] for c in captions) and seen["html"].count("<img") == 3
    doc = next(r for r in seen["responses"] if r["url"] == af.base_url + link)
    assert doc["status"] == 200 and doc["headers"][CSP].startswith("sandbox")
    thumbs = [r for r in seen["responses"] if r["url"].endswith(".jpg")]
    assert len(thumbs) == 3 and all(r["status"] == 200 for r in thumbs), seen  # img-src 'self' under sandbox
    assert (tmp_path / "gallery.png").stat().st_size > 10_000

    # HTML planted straight into the bucket, beside the real gallery pages: it must not run
    gallery_key = urllib.parse.unquote(link.split(f"/caption_s3/{bucket}/", 1)[1])
    with _Canary() as canary:
        evil = (f"<html><head><title>planted</title></head><body><p>planted page</p>"
                f"<script>document.title='PWNED';fetch('{canary.url}/script')</script>"
                f"<img src=x onerror=\"document.title='PWNED';new Image().src='{canary.url}/onerror'\">"
                f"<img src='{canary.url}/img'></body></html>")
        evil_key = gallery_key.replace("index.html", "page-9999.html")
        client.put_object(Bucket=bucket, Key=evil_key, Body=evil.encode(), ContentType="text/html")
        seen = browser.visit(af.base_url + link.replace("index.html", "page-9999.html"), cookies=admin_cookie)
        time.sleep(1)
        assert "planted page" in seen["html"]  # it was served and rendered ...
        assert seen["title"] == "planted" and canary.hits == []  # ... but no script ran, nothing left the page
    doc = next(r for r in seen["responses"] if r["url"].endswith("page-9999.html"))
    assert doc["headers"][CSP].startswith("sandbox") and doc["headers"]["x-content-type-options"] == "nosniff"

    # the grid, as the admin sees it after logging in
    grid = browser.visit(f"{af.base_url}/dags/video_curation/runs/{quoted}", cookies=admin_cookie, settle=15)
    assert "caption" in grid["html"] and "scrape" in grid["html"]
    # the caption task's log, as the admin opens it in the UI: msrun's argv and both ranks' progress lines
    task = browser.visit(f"{af.base_url}/dags/video_curation/runs/{quoted}/tasks/caption/mapped/0",
                         cookies=admin_cookie, settle=12, size=(1500, 1400))
    assert "msrun argv" in task["html"], task["html"][-3000:]
    assert "progress rank 0/2" in task["html"] and "progress rank 1/2" in task["html"], task["html"][-3000:]


def _check_what_the_ui_shows(af, quoted_run: str, wall: float) -> None:
    """Issue 27: the caption task's log as the UI reads it (the REST API's structured log) holds every rank's
    progress lines, and a failed row's warning is still a warning (the UI's level filter finds it); the run's
    duration is its wall time; every component reports healthy."""
    log = af.api("GET", f"/api/v2/dags/video_curation/dagRuns/{quoted_run}/taskInstances/caption/logs/1"
                        "?map_index=0&full_content=true")
    entries = [e for e in log["content"] if isinstance(e, dict)]
    events = [(str(e.get("level", "")).lower(), e.get("event", "")) for e in entries]
    for rank in (0, 1):
        assert any(f"progress rank {rank}/2" in text for _, text in events), events[-40:]
    warnings = [text for level, text in events if level == "warning"]
    assert any("failed (attempt 1)" in text for text in warnings), warnings  # the truncated file's row
    assert not any("failed (attempt" in text for level, text in events if level == "info")
    run = af.api("GET", f"/api/v2/dags/video_curation/dagRuns/{quoted_run}")
    from datetime import datetime

    duration = (datetime.fromisoformat(run["end_date"]) - datetime.fromisoformat(run["start_date"])).total_seconds()
    assert 0 < duration <= wall + 5 and duration >= wall - 30, (duration, wall)
    health = af.request("GET", "/api/v2/monitor/health", token=None)[1]
    assert {k: v["status"] for k, v in health.items()} == {
        "metadatabase": "healthy", "scheduler": "healthy", "triggerer": "healthy", "dag_processor": "healthy"}, health


def _ti(af, run_id: str) -> dict:
    quoted = urllib.parse.quote(run_id, safe="")
    return af.api("GET", f"/api/v2/dags/caption_drill/dagRuns/{quoted}/taskInstances/caption")


def test_task_marked_failed_through_the_api_stops_msrun_gracefully_and_the_next_try_resumes(ui, s3_server,
                                                                                           s3_bucket, tmp_path):
    import io

    import pandas as pd

    af = ui
    client = s3_server.client()
    clips = [(ensure_clip(spec, tmp_path / "clips"), spec, "good") for spec in PARTITION_SPECS[:6]]
    meta, rows = upload_partition(client, s3_bucket, "marked", clips)
    output = meta.replace("meta.csv", "captions.csv")
    run_id = af.trigger("caption_drill", "2026-11-25T00:00:00Z",
                        {"meta_path": meta, "output_uri": output,
                         "caption_options": {**TINY_CAPTION_OPTIONS, "bs": 1}})
    quoted = urllib.parse.quote(run_id, safe="")
    parts = lambda: len(client.list_objects_v2(Bucket=s3_bucket, Prefix="marked/captions.csv.parts/")  # noqa: E731
                        .get("Contents", []))
    seen: dict[int, psutil.Process] = {}

    def running() -> bool:
        for p in caption_processes():
            seen.setdefault(p.pid, p)
        return parts() >= 2

    wait_for(running, 600, "try 1 to journal two parts")
    af.api("PATCH", f"/api/v2/dags/caption_drill/dagRuns/{quoted}/taskInstances/caption", {"new_state": "failed"})
    marked_at = time.monotonic()

    def all_gone() -> bool:
        for p in caption_processes():
            seen.setdefault(p.pid, p)
        return not [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(all_gone, 60, "msrun and every rank to be gone")
    print(f"marked failed -> caption tree gone in {time.monotonic() - marked_at:.1f}s ({len(seen)} processes)")
    assert len(seen) >= 3  # msrun and both ranks were seen

    try1 = af.env.msrun_log_root / "caption_drill"
    worker_logs = sorted(try1.rglob("try1/worker_*.log"))
    assert len(worker_logs) == 2
    for log in worker_logs:
        text = log.read_text(errors="replace")
        assert "SIGTERM received" in text and "graceful SIGTERM stop" in text, text[-3000:]
    task_log = "\n".join(p.read_text(errors="replace") for p in (af.env.home / "logs").rglob("attempt=1*")
                         if "caption_drill" in str(p) and p.is_file())
    assert "msrun was stopped: the task was killed" in task_log, task_log[-3000:]
    assert "TimeoutExpired" not in task_log

    # clear the task: try 2 resumes from the journal
    af.api("POST", "/api/v2/dags/caption_drill/clearTaskInstances",
           {"dry_run": False, "dag_run_id": run_id, "task_ids": ["caption"], "only_failed": True})
    wait_for(lambda: _ti(af, run_id)["state"] == "success", 900, "try 2 to succeed")
    out = pd.read_csv(io.BytesIO(client.get_object(Bucket=s3_bucket, Key="marked/captions.csv")["Body"].read()),
                      dtype=str, keep_default_na=False)
    assert out["path"].tolist() == [r.path for r in rows]
    assert out["text"].tolist() == [r.expected_caption for r in rows]
    done = [ln for log in try1.rglob("try2/worker_*.log") for ln in log.read_text().splitlines() if "already done" in ln]
    assert len(done) == 2 and sum(int(ln.split(" owned, ")[1].split(" already done")[0]) for ln in done) >= 2
    result = af.api("GET", f"/api/v2/dags/caption_drill/dagRuns/{quoted}/taskInstances/caption/xcomEntries/"
                    "return_value?deserialize=true")["value"]
    assert result["skipped"] >= 2 and result["captioned"] == len(rows)


