"""End-to-end demo on the embedded default: local SeaweedFS, local PostgreSQL, SQLite Airflow, the tiny model.

    make demo            # or: .venv/bin/python -m demo [--out demo_output] [--date 2026-11-21]

It uploads synthetic clips (and one broken file) to a local S3 bucket, runs the ``video_curation`` DAG end to
end with ``airflow dags test`` (scrape -> filter -> caption under msrun with 2 CPU workers -> train manifest),
prints the captions next to what each clip shows, and stops every server it started.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import shutil
import sys
import time
from pathlib import Path

from curation import metadb
from testkit.airflow_env import TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.clips import broken_set, ensure_clip
from testkit.demo_clips import DAG_SPECS
from testkit.pgserver import PostgresServer
from testkit.s3server import SeaweedS3

log = logging.getLogger("demo")
BUCKET = "curation"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="working directory (wiped first)")
    parser.add_argument("--date", default="2026-11-21", help="logical date = partition key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    started = time.monotonic()
    with SeaweedS3(data_dir=out / "seaweed") as s3, PostgresServer() as pg:
        client = s3.client()
        s3.create_bucket(BUCKET)
        expected = {}
        for spec in DAG_SPECS:
            key = f"incoming/{args.date}/{spec.filename}"
            client.upload_file(str(ensure_clip(spec, out / "clips")), BUCKET, key)
            expected[f"s3://{BUCKET}/{key}"] = spec.caption
        broken = broken_set(out / "clips" / "broken")
        client.upload_file(str(broken["truncated"]), BUCKET, f"incoming/{args.date}/truncated.mp4")
        log.info("uploaded %d clips and 1 broken file to s3://%s/incoming/%s/", len(DAG_SPECS), BUCKET, args.date)

        pg.create_database("curation")
        conn = pg.connect("curation")
        metadb.apply_schema(conn)
        airflow = AirflowEnv(out / "airflow", s3.env(), pg.uri_for("curation"))
        log.info("migrating the Airflow metadata DB (SQLite)")
        airflow.migrate()
        log.info("running the video_curation DAG for %s (scrape -> filter -> caption -> train)", args.date)
        run = airflow.dags_test("video_curation", args.date,
                                {"bucket": BUCKET, "shard_size": 4, "caption_options": TINY_CAPTION_OPTIONS})
        (out / "dag_run.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            log.error("the DAG run failed; see %s\n%s", out / "dag_run.log", run.stdout[-3000:])
            return 1

        manifest_key = f"manifests/{args.date}/train_manifest.csv"
        manifest = list(csv.DictReader(io.StringIO(
            client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read().decode())))
        with conn, conn.cursor() as cur:
            cur.execute("SELECT path, filter_status, coalesce(filter_reason, ''), coalesce(caption_status, ''), "
                        "coalesce(text, '') FROM video_meta WHERE partition_key = %s ORDER BY path", (args.date,))
            table = cur.fetchall()
        conn.close()
        (out / "train_manifest.csv").write_bytes(client.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())

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
    print(f"DAG run log: {out / 'dag_run.log'}; msrun rank logs: {airflow.msrun_log_root}")  # noqa: T201
    return 0 if right == len(expected) else 1


if __name__ == "__main__":
    sys.exit(main())
