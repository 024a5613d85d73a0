"""Consumer of the curation DAG's training manifests: scheduled on the ``video_training_manifest`` Asset.

It checks each new manifest (readable, the columns a trainer needs, row count as announced) and is the place
to start a training job from. The schedule is a ``PartitionedAssetTimetable`` with the identity mapper: each
partitioned ``video_curation`` run (scheduled, backfilled or triggered with a partition key) queues one run of
this DAG with the SAME partition key, so a training run is per day of videos and re-running one partition
re-checks only its manifest. (In Airflow 3.3 a non-partitioned consumer is never queued by a partitioned
producer's events; and a producer run without a key, e.g. ``airflow dags test``, queues nothing here.)
The manifest's location comes from the triggering event's extra (``uri``, ``rows``, ``partition_key``).
"""

from __future__ import annotations

import os

from airflow.sdk import DAG, Asset, IdentityMapper, PartitionedAssetTimetable, task

# Named, not an s3:// URI: an s3 URI makes every DAG parse initialise the providers manager (~0.6 s).
MANIFEST_ASSET = Asset(name="video_training_manifest")
S3_CONN = os.environ.get("CAPTION_S3_CONN_ID", "caption_s3")

with DAG(dag_id="train_on_manifest",
         schedule=PartitionedAssetTimetable(assets=MANIFEST_ASSET, default_partition_mapper=IdentityMapper()),
         catchup=False, tags=["video", "training"]):

    @task
    def check_manifests(**context) -> list[dict]:
        import csv
        import io

        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        s3 = S3Hook(aws_conn_id=S3_CONN).get_conn()
        checked = []
        key = context.get("partition_key")
        for event in context["triggering_asset_events"][MANIFEST_ASSET]:
            extra = event.extra or {}
            if key and extra.get("partition_key") not in (None, key):
                continue  # another partition's manifest
            bucket, _, key = extra["uri"][len("s3://"):].partition("/")
            text = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
            rows = list(csv.DictReader(io.StringIO(text)))
            if rows and not {"path", "text"} <= set(rows[0]):
                raise ValueError(f"{extra['uri']}: manifest lacks path/text columns")
            if len(rows) != extra.get("rows"):
                raise ValueError(f"{extra['uri']}: {len(rows)} rows, event announced {extra.get('rows')}")
            checked.append({"uri": extra["uri"], "rows": len(rows), "partition_key": extra.get("partition_key")})
        return checked

    check_manifests()
