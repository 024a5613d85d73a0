"""The wrong-credential drill through Airflow itself (`airflow dags test`, real msrun, SeaweedFS): try 1's ranks
hold a wrong S3 secret, fail without publishing or loading a model, and Airflow's retry captions every row.

The wrong secret is the ``bad_secret`` fault limited to try 1 (a connection cannot change between two tries of
one `dags test`); the S3 server itself refuses it. Fault injection reaches the ranks through the operator's
environment (see README, "How the drills inject faults").
"""

from __future__ import annotations

import pytest

from testkit.drill_dag import DAG_ID, DATE, drill_conf, rank_lines
from testkit.outputs import assert_all_captioned, read_output
from testkit.partition import upload_partition

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]


def test_wrong_secret_in_try_1_fails_the_task_and_try_2_captions_every_row(make_drill_env, s3_server,
                                                                             s3_bucket, drill_clips):
    client = s3_server.client()
    meta, rows = upload_partition(client, s3_bucket, "drill-secret", drill_clips[:4])
    output = meta.replace("meta.csv", "captions.csv")
    env = make_drill_env(CAPTION_FAULTS="bad_secret@*/try1", CAPTION_RETRIES="1")
    proc = env.dags_test(DAG_ID, DATE, drill_conf(meta, output))
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]

    assert [(t, s) for _, t, s in env.task_tries(DAG_ID, "caption")] == [(1, "failed"), (2, "success")]
    assert_all_captioned(read_output(client, output), rows)
    refused = rank_lines(env.msrun_log_root, "attempt failed on an environment error")
    assert refused["try1"] and not refused.get("try2"), refused  # try 1 only
    assert "injected-wrong-secret" not in "\n".join(refused["try1"])
    loaded = rank_lines(env.msrun_log_root, "loaded ")
    assert not loaded.get("try1") and loaded["try2"], loaded  # no model loaded for nothing
    [(_, _, result)] = env.task_results(DAG_ID, "caption")
    assert (result["rows"], result["captioned"], result["failed"]) == (len(rows), len(rows), 0)
