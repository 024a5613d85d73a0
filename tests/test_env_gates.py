"""The DAG's ``env`` cannot open an operator gate, and no log level prints S3 credentials.

Each refused name below went straight to the ranks before the allow-list: pickled weights without
``allow_pickled_weights``, an S3 endpoint that beats the Airflow connection's, a preloaded library, a forged
lease; and ``CAPTION_LOG_LEVEL=DEBUG`` made botocore log every request's headers with the key id in them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from airflow.sdk.exceptions import AirflowFailException

from operators.ascend_caption import AscendCaptionOperator
from operators.msrun_hook import MsrunHook, MsrunSpec, rank_environment
from testkit.clips import ensure_clip
from testkit.demo_clips import PARTITION_SPECS
from testkit.partition import upload_partition
from testkit.paths import REPO, TINY_QWEN2VL
from testkit.profile import TINY_ARGS


def _operator(env: dict[str, str], **kwargs) -> AscendCaptionOperator:
    return AscendCaptionOperator(task_id="c", meta_path="s3://b/m.csv", model_dir="/m", env=env, aws_conn_id=None,
                                 **kwargs)


@pytest.mark.parametrize("name, value", [
    ("CAPTION_ALLOW_PICKLED_WEIGHTS", "1"),  # a gate: allow_pickled_weights=True
    ("CAPTION_LEASE", '{"uri": "s3://b/x.lease", "token": "t", "ttl": 60}'),  # the operator's own lease
    ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1"),  # beats the connection's endpoint_url
    ("AWS_SECRET_ACCESS_KEY", "other"),
    ("LD_PRELOAD", "/tmp/x.so"),
    ("PYTHONPATH", "/tmp/elsewhere"),
    ("PATH", "/tmp/bin"),
    ("AIRFLOW__CORE__FERNET_KEY", "x"),
])
def test_env_refuses_what_is_not_a_tuning_variable(name, value):
    with pytest.raises(AirflowFailException, match=f"env may not set {name} "):
        _operator({name: value})._rank_env(None)


def test_env_passes_tuning_variables_and_each_gate_opens_only_by_its_parameter():
    tuning = {"HCCL_CONNECT_TIMEOUT": "60", "MS_ALLOC_CONF": "enable_vmm:True", "ASCEND_RT_VISIBLE_DEVICES": "0,1",
              "OMP_NUM_THREADS": "2", "CAPTION_LOG_LEVEL": "DEBUG", "CAPTION_DECODE_THREADS": "1", "TZ": "UTC"}
    env = _operator(tuning)._rank_env(None)
    assert {k: env[k] for k in tuning} == tuning and "CAPTION_ALLOW_PICKLED_WEIGHTS" not in env
    assert _operator({}, allow_pickled_weights=True)._rank_env(None)["CAPTION_ALLOW_PICKLED_WEIGHTS"] == "1"
    assert _operator({"CAPTION_FAULTS": "slow@0:1"}, allow_fault_injection=True)._rank_env(None)["CAPTION_FAULTS"]


def test_the_workers_own_gate_settings_never_reach_a_rank(monkeypatch):
    worker = {"PATH": "/usr/bin", "CAPTION_ALLOW_PICKLED_WEIGHTS": "1", "CAPTION_LEASE": "{}", "CAPTION_X": "1"}
    assert rank_environment(worker, {}) == {"PATH": "/usr/bin", "CAPTION_X": "1"}
    assert rank_environment(worker, {"CAPTION_ALLOW_PICKLED_WEIGHTS": "1"})["CAPTION_ALLOW_PICKLED_WEIGHTS"] == "1"
    monkeypatch.setenv("CAPTION_ALLOW_PICKLED_WEIGHTS", "1")  # the hook builds from the worker's real environment
    hook = MsrunHook(MsrunSpec(script="s.py", script_args=[], worker_num=1, local_worker_num=1, log_dir="/tmp/l"))
    assert "CAPTION_ALLOW_PICKLED_WEIGHTS" not in hook.build_env()


@pytest.mark.integration
def test_a_debug_run_logs_no_credentials(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    clips = [(ensure_clip(spec, tmp_path), spec, "good") for spec in list(PARTITION_SPECS)[:2]]
    meta, _ = upload_partition(client, s3_bucket, "day=2026-12-07/debug", clips)
    env = {**os.environ, **s3_server.env(), "CAPTION_LOG_LEVEL": "DEBUG"}
    proc = subprocess.run([sys.executable, str(REPO / "captioning_core" / "caption_qwen2vl.py"), meta,
                           "--pretrained_model_name_or_path", str(TINY_QWEN2VL), *TINY_ARGS],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert " DEBUG " in log  # the run really logged at DEBUG
    assert s3_server.access_key not in log and s3_server.secret_key not in log
