"""End-to-end demo on the embedded default: local SeaweedFS, local PostgreSQL, local Airflow, the tiny model.

    make demo            # or: .venv/bin/python -m demo [--out demo_output] [--date 2026-11-21] [--ui]
    make demo DEMO_ARGS=--cluster          # the same DAG on a local Celery cluster (demo/cluster.py)

It uploads synthetic clips (and one broken file) to a local S3 bucket and runs the ``video_curation`` DAG end
to end the way a deployment does, on one machine: Airflow's scheduler, dag-processor, triggerer and API server
as real processes (LocalExecutor, metadata DB on the demo's PostgreSQL), the run triggered through the REST API
(scrape -> filter -> caption under msrun with 2 CPU workers -> train manifest). Task logs are written and
served, durations are real. It prints the captions next to what each clip shows, and stops every server it
started, on success, failure, Ctrl-C or SIGTERM. With ``--ui`` the UI stays up behind a login (the user and
password are printed once).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

from captioning_core.layout import PartitionLayout
from curation import metadb
from demo import cluster as cluster_demo
from testkit.airflow_env import TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.airflow_services import AirflowServices
from testkit.clips import broken_set, ensure_clip
from testkit.demo_clips import DAG_SPECS
from testkit.pgserver import PostgresServer
from testkit.s3server import SeaweedS3

log = logging.getLogger("demo")
BUCKET = "curation"
# video_curation's shards are named at run time by its filter task: the gallery view serves their outputs only
# under prefixes the API server's configuration names (plugins/caption_gallery_scope.py)
GALLERY_SCOPE = {"AIRFLOW__CAPTION_GALLERY__OUTPUT_PREFIXES": json.dumps({"video_curation": [f"s3://{BUCKET}/meta/"]})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="working directory (wiped first)")
    parser.add_argument("--date", default="2026-11-21", help="logical date = partition key")
    parser.add_argument("--ui", action="store_true",
                        help="afterwards, serve the Airflow UI (and the caption gallery) on 127.0.0.1 until Ctrl-C")
    parser.add_argument("--screenshot", metavar="PNG", default=None,
                        help="afterwards, save a headless-Chromium screenshot of the caption gallery here")
    parser.add_argument("--log-screenshot", metavar="PNG", default=None,
                        help="afterwards, save a headless-Chromium screenshot of the caption task's log in the UI here")
    parser.add_argument("--cluster", action="store_true",
                        help="run on a local CeleryExecutor cluster (Redis, PostgreSQL, two ascend workers) with a "
                             "backfill over two daily partitions, instead of the embedded `airflow dags test`")
    parser.add_argument("--grid-screenshot", metavar="PNG", default=None,
                        help="with --cluster: save screenshots of the grid view and the runs list (partition keys)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server started below is stopped by its context manager
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    started = time.monotonic()
    with SeaweedS3(data_dir=out / "seaweed") as s3, PostgresServer() as pg:
        client = s3.client()
        s3.create_bucket(BUCKET)
        expected = {}
        keys = cluster_demo.partition_keys(args.date) if args.cluster else [args.date]
        for i, spec in enumerate(DAG_SPECS):
            key = f"incoming/{keys[i % len(keys)]}/{spec.filename}"
            client.upload_file(str(ensure_clip(spec, out / "clips")), BUCKET, key)
            expected[f"s3://{BUCKET}/{key}"] = spec.caption
        broken = broken_set(out / "clips" / "broken")
        client.upload_file(str(broken["truncated"]), BUCKET, f"incoming/{args.date}/truncated.mp4")
        log.info("uploaded %d clips and 1 broken file to s3://%s/incoming/%s/", len(DAG_SPECS), BUCKET, args.date)

        pg.create_database("curation")
        conn = pg.connect("curation")
        metadb.apply_schema(conn)
        airflow = AirflowEnv(out / "airflow", s3.env(), pg.uri_for("curation"), extra=dict(GALLERY_SCOPE))
        if args.cluster:
            pg.create_database("airflow")
            s3.create_bucket("airflow-logs")
            report = cluster_demo.run(airflow, pg.uri_for("airflow"), "airflow-logs", BUCKET, keys, ui=args.ui,
                                      grid_png=args.grid_screenshot, wait_for_ctrl_c=_wait_for_ctrl_c)
            return _cluster_report(conn, expected, keys, report, started)
        pg.create_database("airflow")
        users = {"admin": "admin"} if args.ui else None  # --ui: the UI and the gallery behind a login
        log.info("starting Airflow: scheduler, dag-processor, triggerer, api-server (LocalExecutor, PostgreSQL)")
        with AirflowServices(airflow, pg.uri_for("airflow"), users=users) as af:
            af.wait_for_dag("video_curation")
            log.info("running the video_curation DAG for %s (scrape -> filter -> caption -> train)", args.date)
            run_id = af.trigger("video_curation", f"{args.date}T00:00:00Z",
                                {"bucket": BUCKET, "shard_size": 4, "caption_options": TINY_CAPTION_OPTIONS})
            state = af.wait_for_run("video_curation", run_id)
            (out / "dag_run.log").write_text(_task_logs(af, run_id))
            if state != "success":
                log.error("the DAG run ended %s; see %s\n%s", state, out / "dag_run.log", af.tail("scheduler", 60))
                return 1
            manifest_key = f"manifests/{args.date}/train_manifest.csv"
            manifest = list(csv.DictReader(io.StringIO(
                client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read().decode())))
            with conn, conn.cursor() as cur:
                cur.execute("SELECT path, filter_status, coalesce(caption_error, filter_reason, ''), "
                            "coalesce(caption_status, ''), coalesce(text, '') FROM video_meta "
                            "WHERE partition_key = %s ORDER BY path", (args.date,))
                table = cur.fetchall()
            conn.close()
            (out / "train_manifest.csv").write_bytes(
                client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
            _print_report(table, expected, manifest, manifest_key, out, airflow, started)
            if args.ui or args.screenshot or args.log_screenshot:
                token = af.token("admin") if users else af.request("GET", "/auth/token")[1]["access_token"]
                url = f"{af.base_url}{_gallery_link(af, token)}"
                if args.screenshot:
                    from testkit import browser

                    browser.visit(url, cookies={"_token": token}, screenshot=args.screenshot, size=(1200, 760))
                    log.info("gallery screenshot saved to %s", args.screenshot)
                if args.log_screenshot:
                    from urllib.parse import quote

                    from testkit import browser

                    page = f"{af.base_url}/dags/video_curation/runs/{quote(run_id, safe='')}/tasks/caption/mapped/0"
                    browser.visit(page, cookies={"_token": token}, screenshot=args.log_screenshot, size=(1500, 900),
                                  settle=12)
                    log.info("task log screenshot saved to %s", args.log_screenshot)
                if args.ui:
                    print(f"\nAirflow UI: {af.base_url}/dags/video_curation  "  # noqa: T201
                          f"(log in as admin, password {af.passwords['admin']})\n"
                          f"caption gallery: {url}\nCtrl-C stops everything.")
                    _wait_for_ctrl_c()
    return 0 if all(_caption_of(table, p) == c for p, c in expected.items()) else 1


def _cluster_report(conn, expected, keys, report, started) -> int:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT partition_key, path, coalesce(caption_status, filter_status), coalesce(text, '') "
                    "FROM video_meta WHERE partition_key = ANY(%s) ORDER BY partition_key, path", (keys,))
        table = cur.fetchall()
    conn.close()
    right = 0
    for key in keys:
        info = report.get(key, {})
        print(f"\npartition {key}: run {info.get('state')}, captioned on {sorted(info.get('hosts', []))}")  # noqa: T201
        for pkey, path, status, text in table:
            if pkey == key:
                right += text == expected.get(path)
                print(f"  {path.rsplit('/', 1)[-1]:52} {status:10} {text}  ({expected.get(path, 'broken file')})")  # noqa: T201
    print(f"\n{right}/{len(expected)} captions match the clip content ({time.monotonic() - started:.0f} s)")  # noqa: T201
    return 0 if right == len(expected) and all(r["state"] == "success" for r in report.values()) else 1


def _caption_of(table, path: str) -> str | None:
    return next((row[4] for row in table if row[0] == path), None)


def _task_logs(af: AirflowServices, run_id: str) -> str:
    """Every task's log of the run, as the UI shows it (the REST API's structured log), one line per event."""
    from urllib.parse import quote

    quoted = quote(run_id, safe="")
    lines = []
    for ti in af.api("GET", f"/api/v2/dags/video_curation/dagRuns/{quoted}/taskInstances")["task_instances"]:
        lines.append(f"===== {ti['task_id']} map_index={ti['map_index']} try={ti['try_number']} {ti['state']}")
        try:
            log_ = af.api("GET", f"/api/v2/dags/video_curation/dagRuns/{quoted}/taskInstances/{ti['task_id']}/logs/"
                          f"{max(1, ti['try_number'])}?map_index={ti['map_index']}&full_content=true")
        except Exception as err:  # noqa: BLE001 - a task that never ran has no log; say so and go on
            lines.append(f"(no log: {err})")
            continue
        for entry in log_.get("content", []):
            if isinstance(entry, dict):
                lines.append(f"{entry.get('timestamp', '')} {str(entry.get('level', '')).upper():8} "
                             f"{entry.get('event', '')}")
            else:
                lines.append(str(entry))
    return "\n".join(lines) + "\n"


def _gallery_link(af: AirflowServices, token: str) -> str:
    """The first shard's "Caption gallery" extra link of the newest run, as the UI gets it."""
    from urllib.parse import quote

    runs = af.request("GET", "/api/v2/dags/video_curation/dagRuns?order_by=-run_after&limit=1", token=token)[1]
    run_id = quote(runs["dag_runs"][0]["dag_run_id"], safe="")
    links = af.request("GET", f"/api/v2/dags/video_curation/dagRuns/{run_id}/taskInstances/caption/links"
                       "?map_index=0", token=token)[1]
    return links["extra_links"]["Caption gallery"] or "/"


def _wait_for_ctrl_c() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _print_report(table, expected, manifest, manifest_key, out, airflow, started) -> None:

    right = 0
    print(f"\n{'video':52} {'status':10} caption  (what the clip shows)")  # noqa: T201 - the demo's report
    for path, fstatus, reason, cstatus, text in table:
        truth = expected.get(path)
        right += truth is not None and text == truth
        status = cstatus or fstatus
        shown = text if cstatus == "ok" else reason[:60]
        print(f"{path.rsplit('/', 1)[-1]:52} {status:10} {shown}  ({truth or 'broken file'})")  # noqa: T201
    print(f"\n{right}/{len(expected)} captions match the clip content; manifest has {len(manifest)} rows "  # noqa: T201
          f"({time.monotonic() - started:.0f} s)")
    print(f"manifest: s3://{BUCKET}/{manifest_key} (copy: {out / 'train_manifest.csv'})")  # noqa: T201
    print(f"task logs (as the UI shows them): {out / 'dag_run.log'}; msrun rank logs: "  # noqa: T201
          f"{airflow.msrun_log_root}; Airflow components: {airflow.home}/*.log")
    galleries = PartitionLayout(f"s3://{BUCKET}/meta/*/shard-*/meta_caption_qwen2vl.csv").gallery_index
    print(f"caption galleries: {galleries} "  # noqa: T201
          "(run with --ui to browse them and the Airflow UI)")


if __name__ == "__main__":
    sys.exit(main())
