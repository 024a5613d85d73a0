"""The testkit against the real things: SeaweedFS S3, PostgreSQL, ffmpeg-encoded clips decoded by decord."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import numpy as np
import psycopg2
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from testkit.clips import BROKEN_KINDS, COLORS, STANDARD_SPECS, ClipSpec, ensure_clip, render_frames
from testkit.pgserver import PostgresServer
from testkit.ports import LOOPBACK, listening_tcp
from testkit.process import children_of, pid_alive
from testkit.s3server import SeaweedS3

pytestmark = pytest.mark.integration


# --- S3 -----------------------------------------------------------------------------------------------


def test_s3_put_get_and_transfer(s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="dir/hello.txt", Body=b"hello")
    assert s3.get_object(Bucket=s3_bucket, Key="dir/hello.txt")["Body"].read() == b"hello"

    payload = os.urandom(256 * 1024)
    src, dst = tmp_path / "blob.bin", tmp_path / "back.bin"
    src.write_bytes(payload)
    s3.upload_file(str(src), s3_bucket, "dir/blob.bin")
    s3.download_file(s3_bucket, "dir/blob.bin", str(dst))
    assert dst.read_bytes() == payload
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="dir/")["Contents"]]
    assert keys == ["dir/blob.bin", "dir/hello.txt"]


def test_s3_wrong_secret_is_rejected(s3_server: SeaweedS3, s3_bucket: str) -> None:
    bad = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key + "x",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    with pytest.raises(ClientError) as info:
        bad.list_objects_v2(Bucket=s3_bucket)
    assert info.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}
    with pytest.raises(ClientError):
        bad.put_object(Bucket=s3_bucket, Key="nope", Body=b"x")


def test_s3_conditional_put_on_existing_key_is_412(s3_server: SeaweedS3, s3_bucket: str) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=s3_bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=s3_bucket, Key="once")["Body"].read() == b"first"


def test_s3_env_configures_a_plain_boto3_client(
    s3_server: SeaweedS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = s3_server.env()
    assert env["AWS_ENDPOINT_URL"] == s3_server.endpoint_url and env["AWS_DEFAULT_REGION"] == "us-east-1"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
    s3.put_object(Bucket=s3_bucket, Key="via-env", Body=b"ok")
    assert s3.get_object(Bucket=s3_bucket, Key="via-env")["Body"].read() == b"ok"


def test_s3_takes_more_buckets_than_a_long_session_makes(s3_server: SeaweedS3) -> None:
    """Each bucket is a collection with a volume of its own. Sized from the disk, weed allowed 59 volumes
    here (60 GB free) and the 60th bucket's PutObject failed with InternalError late in `make test`."""
    client = s3_server.client()
    for number in range(80):
        bucket = s3_server.create_bucket(f"many-{number}-{os.getpid()}")
        client.put_object(Bucket=bucket, Key="k", Body=b"x")


def test_s3_listens_only_on_loopback_and_chosen_ports(s3_server: SeaweedS3) -> None:
    assert s3_server.pid is not None
    bound = listening_tcp([s3_server.pid])
    assert bound, "ss found no listening socket for weed"
    assert {addr for addr, _, _ in bound} == {LOOPBACK}
    assert {port for _, port, _ in bound} == s3_server.ports.all()


def test_s3_data_survives_restart(tmp_path: Path) -> None:
    with SeaweedS3(data_dir=tmp_path / "weed") as server:
        server.create_bucket("keep-me")
        server.client().put_object(Bucket="keep-me", Key="k", Body=b"persisted")
        old_pid, old_port = server.pid, server.ports.s3
        server.restart()
        assert server.pid not in (None, old_pid) and server.ports.s3 == old_port
        assert not pid_alive(old_pid)
        assert server.client().get_object(Bucket="keep-me", Key="k")["Body"].read() == b"persisted"


def test_s3_stop_leaves_no_process(tmp_path: Path) -> None:
    server = SeaweedS3(data_dir=tmp_path / "weed").start()
    pid = server.pid
    assert pid is not None and pid_alive(pid)
    server.stop()
    assert not pid_alive(pid) and server.pid is None
    assert listening_tcp([pid]) == []
    server.stop()  # idempotent
    server.close()


# --- PostgreSQL ---------------------------------------------------------------------------------------


def test_pg_sql_round_trip(pg_database: str) -> None:
    with psycopg2.connect(pg_database) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE clips (id serial PRIMARY KEY, caption text NOT NULL)")
        cur.executemany("INSERT INTO clips (caption) VALUES (%s)", [("a red square moves left",), ("b",)])
        cur.execute("SELECT caption FROM clips ORDER BY id")
        assert [row[0] for row in cur.fetchall()] == ["a red square moves left", "b"]
    conn.close()


def test_pg_wrong_password_is_rejected(pg_server: PostgresServer) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host=pg_server.host, port=pg_server.port, user=pg_server.user, password="wrong", dbname="postgres"
        )


def test_pg_uri_and_loopback_only(pg_server: PostgresServer) -> None:
    conn = psycopg2.connect(pg_server.uri)
    conn.close()
    assert pg_server.pid is not None
    bound = listening_tcp([pg_server.pid])
    assert {(addr, port) for addr, port, _ in bound} == {(LOOPBACK, pg_server.port)}


def test_pg_restart_and_stop_leave_no_process() -> None:
    server = PostgresServer()
    try:
        server.start()
        dsn = server.create_database("persist")
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        conn.close()
        server.restart()
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT x FROM t")
            assert cur.fetchone() == (42,)
        conn.close()
        pid = server.pid
        assert pid is not None
        children = children_of(pid)
        assert len(children) >= 3  # checkpointer, background writer, walwriter, ...
        server.stop()
        assert server.pid is None
        assert not any(pid_alive(p) for p in children)
        server.stop()  # idempotent
    finally:
        server.close()
    assert not server.base_dir.exists()


# --- clips --------------------------------------------------------------------------------------------


def test_clip_spec_caption_and_validation() -> None:
    assert ClipSpec("red", "left", "square").caption == "a red square moves left"
    assert ClipSpec("yellow", "up", "circle").caption == "a yellow circle moves up"
    with pytest.raises(ValueError):
        ClipSpec(color="purple")
    with pytest.raises(ValueError):
        ClipSpec(width=321)


def test_render_frames_is_pure_and_uses_pure_colours() -> None:
    spec = ClipSpec("yellow", "down", "circle", 64, 48, 25, 1.0, 5)
    a, b = render_frames(spec), render_frames(spec)
    assert a.shape == (25, 48, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    colours = {tuple(int(c) for c in px) for px in a.reshape(-1, 3)}
    assert colours == {(0, 0, 0), COLORS["yellow"]}


def _dominant_colour(frame: np.ndarray) -> str:
    lit = frame[frame.max(axis=-1) > 100]
    assert len(lit) > 0, "no lit pixel in frame"
    mean = lit.astype(float).mean(axis=0)
    return min(COLORS, key=lambda name: float(np.linalg.norm(mean - np.array(COLORS[name]))))


def _centroid(frame: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(frame.max(axis=-1) > 100)
    return float(ys.mean()), float(xs.mean())


@pytest.mark.parametrize("spec", STANDARD_SPECS, ids=lambda s: s.filename.removesuffix(".mp4"))
def test_good_clip_decodes_to_its_spec(spec: ClipSpec, clip_dir: Path) -> None:
    import decord

    path = ensure_clip(spec, clip_dir)
    vr = decord.VideoReader(str(path))
    n = len(vr)
    assert abs(n - spec.fps * spec.seconds) <= 1
    assert vr.get_avg_fps() == pytest.approx(spec.fps, rel=0.01)
    frames = vr.get_batch([0, n // 2, n - 1]).asnumpy()
    assert frames.shape == (3, spec.height, spec.width, 3)
    assert _dominant_colour(frames[1]) == spec.color
    (y0, x0), (y1, x1) = _centroid(frames[0]), _centroid(frames[2])
    travel = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}[spec.direction]
    across = {"left": abs(y1 - y0), "right": abs(y1 - y0), "up": abs(x1 - x0), "down": abs(x1 - x0)}
    extent = spec.width if spec.direction in ("left", "right") else spec.height
    assert travel > extent / 3, f"shape moved {travel:.0f}px {spec.direction} (expected most of {extent})"
    assert across[spec.direction] < 2


@pytest.mark.parametrize("kind", [k for k in BROKEN_KINDS if k != "one_frame"])
def test_broken_clip_fails_to_decode(kind: str, broken_clips: dict[str, Path]) -> None:
    import decord

    path = broken_clips[kind]
    with pytest.raises(Exception):  # noqa: B017 - decord raises RuntimeError or DECORDError (not a RuntimeError)
        vr = decord.VideoReader(str(path))
        vr[0].asnumpy()
        vr[len(vr) - 1].asnumpy()


def test_one_frame_clip_decodes(broken_clips: dict[str, Path]) -> None:
    import decord

    vr = decord.VideoReader(str(broken_clips["one_frame"]))
    assert len(vr) == 1
    frame = vr[0].asnumpy()
    assert frame.shape == (240, 320, 3)
    assert _dominant_colour(frame) == "green"


def test_broken_kinds_are_what_they_claim(broken_clips: dict[str, Path]) -> None:
    import av

    assert broken_clips["zero_byte"].stat().st_size == 0
    truncated = broken_clips["truncated"].read_bytes()
    assert 0 <= truncated.find(b"moov") < truncated.find(b"mdat")
    with av.open(str(broken_clips["audio_only"])) as container:
        assert [s.type for s in container.streams] == ["audio"]
    with av.open(str(broken_clips["no_frames"])) as container:
        assert [s.type for s in container.streams] == ["video"]
        assert sum(1 for _ in container.decode(video=0)) == 0
    assert broken_clips["not_video"].read_text().startswith("this is a text file")


def test_airflow_homes_after_the_first_copy_its_migrated_db(s3_server: SeaweedS3, tmp_path: Path) -> None:
    from testkit import airflow_env
    from testkit.airflow_env import AirflowEnv

    first = AirflowEnv(tmp_path / "a", s3_server.env(), "postgresql://unused")
    first.migrate()
    template = airflow_env._MIGRATED_SQLITE["db"]
    second = AirflowEnv(tmp_path / "b", s3_server.env(), "postgresql://unused")
    second.migrate()
    assert (second.home / "airflow.db").read_bytes() == template.read_bytes()
    assert second.airflow("db", "check-migrations", "-t", "0").returncode == 0  # the schema is current
    assert [row for row in second._query("SELECT pool FROM slot_pool")] == [("default_pool",)]
