"""The lease is judged by S3's clock, not a host's (real SeaweedFS; contenders are separate processes whose
clock runs ahead or behind).

A host's clock can be wrong by a minute (NTP not yet synced after boot, a VM resumed from a snapshot). Before,
a contender compared the holder's ``expires_at`` with its own clock, so a host 61 s ahead took a live lease and
a rank 61 s ahead refused to publish on its own. Now a lease expires ``ttl`` seconds after its object was last
written, by the server's ``Date`` and ``Last-Modified``; and a fenced write may retry only while the lease runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from operators.lease import S3Lease
from testkit.airflow_env import REPO

pytestmark = [pytest.mark.integration]

# A process whose wall clock is SKEW seconds off (Python's time.time: what the lease and the fence read).
SKEWED = """
import json, os, sys, time
_real = time.time
time.time = lambda: _real() + float(os.environ["SKEW"])
sys.path.insert(0, os.path.join(os.environ["REPO"], "plugins"))
import boto3
from operators.lease import S3Lease
from captioning_core.lease_fence import LeaseFence, LeaseLostError
what = os.environ["WHAT"]
if what == "acquire":
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    lease = S3Lease(client, os.environ["BUCKET"], os.environ["KEY"], holder="skewed-contender")
    print(json.dumps(lease.try_acquire()))
else:
    fence = LeaseFence.from_env()
    try:
        print(json.dumps(round(LeaseFence(fence.uri, fence.token, fence.ttl, wait=0).check(), 1)))
    except LeaseLostError as err:
        print(json.dumps(str(err)))
"""


def _skewed(s3_server, skew: float, **env: str):
    run_env = {**os.environ, **s3_server.env(), "SKEW": str(skew), "REPO": str(REPO), **env}
    out = subprocess.run([sys.executable, "-c", SKEWED], env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _held(s3_server, bucket: str, key: str, ttl: float) -> S3Lease:
    """A lease acquired here (this host's clock is right), renewal stopped so only ``ttl`` decides."""
    lease = S3Lease(s3_server.client(), bucket, key, holder="holder", ttl=ttl)
    assert lease.try_acquire()
    return lease


def test_a_contender_whose_clock_is_a_minute_ahead_does_not_take_a_live_lease(s3_server, s3_bucket):
    _held(s3_server, s3_bucket, "ahead.lease", ttl=60)
    assert _skewed(s3_server, +61, WHAT="acquire", BUCKET=s3_bucket, KEY="ahead.lease") is False
    body = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key="ahead.lease")["Body"].read())
    assert body["holder"] == "holder"


def test_a_contender_whose_clock_is_behind_takes_an_expired_lease(s3_server, s3_bucket):
    _held(s3_server, s3_bucket, "behind.lease", ttl=2)
    time.sleep(4.5)  # past ttl plus the whole-second resolution of Date and Last-Modified, by S3's clock
    assert _skewed(s3_server, -120, WHAT="acquire", BUCKET=s3_bucket, KEY="behind.lease") is True
    body = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key="behind.lease")["Body"].read())
    assert body["holder"] == "skewed-contender"


def test_the_publish_fence_reads_s3s_clock_not_the_ranks(s3_server, s3_bucket):
    live = _held(s3_server, s3_bucket, "fence-live.lease", ttl=60)
    left = _skewed(s3_server, +61, WHAT="fence", **live.fence().env())
    assert isinstance(left, float) and 50 <= left <= 60, left  # ours, fresh: a clock ahead changes nothing

    dead = _held(s3_server, s3_bucket, "fence-dead.lease", ttl=2)
    time.sleep(3.5)
    refused = _skewed(s3_server, -120, WHAT="fence", **dead.fence().env())
    assert isinstance(refused, str) and "not provably ours: it expires in" in refused, refused


def test_a_fenced_write_retries_only_while_the_lease_runs(s3_env):
    """An S3 outage after the fence's check: the output write gives up when the lease's time is out, not
    after the whole retry budget (a refused connection on a closed port of 127.0.0.1 stands for the outage)."""
    from captioning_core import storage
    from testkit.ports import free_port

    s3_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    s3_env.setenv("CAPTION_S3_RETRY_SECONDS", "60")
    storage.s3_client.cache_clear()
    started = time.monotonic()
    with pytest.raises(Exception) as err, storage.retry_budget(2.0):
        storage.write_bytes("s3://bucket/out.csv", b"x")
    assert storage.is_transient(err.value)
    assert time.monotonic() - started < 15  # a 2 s budget plus one backoff, far from the 60 s retry budget
