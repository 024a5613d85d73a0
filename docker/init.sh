#!/usr/bin/env bash
# One-shot init for docker-compose: Airflow DB migration, the curation database and schema, the bucket.
set -euo pipefail
airflow db migrate
export PGPASSWORD="${POSTGRES_PASSWORD}"
psql -h postgres -U airflow -d airflow -tc "SELECT 1 FROM pg_database WHERE datname = 'curation'" | grep -q 1 \
  || psql -h postgres -U airflow -d airflow -c "CREATE DATABASE curation"
python /opt/airflow/plugins/curation/metadb.py "${AIRFLOW_CONN_CURATION_DB}"
python - <<'PY'
from airflow.providers.amazon.aws.hooks.s3 import S3Hook
hook = S3Hook(aws_conn_id="caption_s3")
for bucket in ("curation", "airflow-logs"):  # data, and remote task logs
    if not hook.check_for_bucket(bucket):
        hook.create_bucket(bucket)
PY
# The caption tasks' pool: ascend hosts x NPUs per host / NPUs per caption task
airflow pools set "${CAPTION_POOL}" "${CAPTION_NPU_POOL_SLOTS}" "NPU slots for caption tasks"
