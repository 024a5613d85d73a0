"""A link planted in one DAG's XCom does not open another DAG's gallery (issue 25 #9).

Two tenants, each a DAG in its own bundle owned by its own team (Airflow's multi-team mode, the simple auth
manager's ``user:role:team`` users): ``b_only`` may read and edit DAG B only. Both DAGs caption for real
(``airflow dags test``, tiny model, msrun). Then B's hostile side plants A's output as a caption link twice,
the ways an attacker can: B's own task code pushes ``_link_CaptionOutputLink`` (tests/airflow_tenant_dags),
and ``b_only`` overwrites the caption task's link through the XCom REST API. The gallery view used to serve
A's gallery, thumbnails and captions under either; it now serves a recorded output only under a prefix the
producing task's serialized template allows (caption_gallery_scope), so both give 404, while each tenant's
own links keep working.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse

import pytest

from captioning_core.layout import PartitionLayout
from testkit.airflow_env import REPO, TINY_CAPTION_OPTIONS, AirflowEnv
from testkit.airflow_services import AirflowServices
from testkit.clips import ensure_clip
from testkit.demo_clips import PARTITION_SPECS
from testkit.partition import upload_partition

pytestmark = [pytest.mark.e2e, pytest.mark.msrun, pytest.mark.integration]

TENANTS = ("a", "b")
USERS = {"admin": "admin", "b_only": "user:team_b"}  # name -> role[:teams]
REFUSED = "not a caption gallery object of this task instance"
LINK = "_link_CaptionOutputLink"


def _deployment(tmp_path, s3_server) -> AirflowEnv:
    """One DAG bundle per tenant, each owned by its team."""
    bundles = []
    for tenant in TENANTS:
        folder = tmp_path / "bundles" / tenant
        folder.mkdir(parents=True)
        shutil.copy(REPO / "tests" / "airflow_tenant_dags" / "tenant.py", folder / "tenant.py")
        bundles.append({"name": f"tenant_{tenant}", "team_name": f"team_{tenant}",
                        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                        "kwargs": {"path": str(folder), "refresh_interval": 0}})
    env = AirflowEnv(tmp_path / "airflow", s3_server.env(), "postgresql://unused", extra={
        "AIRFLOW__CORE__MULTI_TEAM": "True", "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles)})
    env.migrate()
    env.airflow("teams", "sync")
    return env


def _caption(env: AirflowEnv, tenant: str, conf: dict) -> tuple[str, str]:
    """(run id, output URI) of one real run of tenant's DAG."""
    dag_id = f"tenant_{tenant}"
    proc = env.airflow("dags", "test", dag_id, "2026-11-27", "-B", dag_id, "-c", json.dumps(conf), check=False)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    ((run_id, _, result),) = env.task_results(dag_id, "caption")
    return run_id, result["output"]


def test_a_link_planted_in_dag_b_does_not_open_dag_a_gallery(s3_server, s3_bucket, tmp_path):
    client = s3_server.client()
    env = _deployment(tmp_path, s3_server)
    runs, layouts, rows = {}, {}, {}
    for i, tenant in enumerate(TENANTS):
        clips = [(ensure_clip(spec, tmp_path / "clips"), spec, "good") for spec in PARTITION_SPECS[2 * i:2 * i + 2]]
        meta, rows[tenant] = upload_partition(client, s3_bucket, f"in-{tenant}", clips)
        conf = {"bucket": s3_bucket, "meta_path": meta, "caption_options": dict(TINY_CAPTION_OPTIONS)}
        if tenant == "b":  # B's task code records A's output link as its own
            conf["plant"] = f"/caption-gallery/x/x/x/-1/caption_s3/{s3_bucket}/{layouts['a'].output}"
        runs[tenant], output = _caption(env, tenant, conf)
        layouts[tenant] = PartitionLayout(output.split(f"s3://{s3_bucket}/", 1)[1])
    a = layouts["a"]
    a_thumb = client.list_objects_v2(Bucket=s3_bucket, Prefix=a.gallery + "thumbs/")["Contents"][0]["Key"]
    a_objects = (a.gallery_index, a_thumb, a.output, a.summary)

    def base(tenant: str, task_id: str = "caption") -> str:
        quoted = urllib.parse.quote(runs[tenant], safe="")
        return f"/caption-gallery/tenant_{tenant}/{quoted}/{task_id}/-1/caption_s3/{s3_bucket}/"

    with AirflowServices(env, components=("api-server",), users=USERS) as af:
        admin, b_only = af.token("admin"), af.token("b_only")

        def get(prefix: str, key: str, token: str) -> tuple[int, object]:
            status, body, _ = af.request("GET", prefix + urllib.parse.quote(key), token=token)
            return status, body

        # the legitimate links: A's for the admin, B's for b_only, who may not read A
        quoted_b = urllib.parse.quote(runs["b"], safe="")
        links = af.api("GET", f"/api/v2/dags/tenant_b/dagRuns/{quoted_b}/taskInstances/caption/links")
        assert links["extra_links"]["Caption gallery"] == base("b") + urllib.parse.quote(layouts["b"].gallery_index)
        for tenant, token in (("a", admin), ("b", b_only)):
            status, page = get(base(tenant), layouts[tenant].gallery_index, token)
            assert status == 200 and all(r.expected_caption in page.decode() for r in rows[tenant]), (tenant, page)
            status, body = get(base(tenant), layouts[tenant].output, token)
            assert status == 200 and all(r.path in body.decode() for r in rows[tenant])
        for key in a_objects:
            assert get(base("a"), key, b_only)[0] == 403

        # planted by B's task code (its own extra-link XCom), and over the caption task's link by the XCom API
        status, _, _ = af.request(
            "PATCH", f"/api/v2/dags/tenant_b/dagRuns/{quoted_b}/taskInstances/caption/xcomEntries/{LINK}",
            {"value": base("a") + urllib.parse.quote(a.output)}, token=b_only)
        assert status == 200  # b_only may write B's XComs: the planted link is recorded
        answers = {(task_id, user, key): get(base("b", task_id), key, token)
                   for task_id in ("plant", "caption") for user, token in (("b_only", b_only), ("admin", admin))
                   for key in a_objects}
        served = {k: status for k, (status, _) in answers.items() if status != 404}
        assert not served, f"A's objects served under B's planted links: {served}"
        assert all(body["detail"] == REFUSED for _, body in answers.values())  # the same answer as any non-output
        # A's own link is untouched
        assert get(base("a"), a.gallery_index, admin)[0] == 200
