"""Local paths and ``s3://`` URIs behind one small interface, with atomic publish.

S3 endpoint and credentials come from the standard environment variables only
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``),
never from argv. Transient S3 errors (connection refused or reset, timeouts, 5xx, throttling) are retried
with exponential backoff for up to ``CAPTION_S3_RETRY_SECONDS`` (default 120) per operation, so an S3 restart
is ridden out; a longer outage fails the operation (and the attempt) cleanly. Client errors (missing key,
412, access denied) are never retried.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

S3_SCHEME = "s3://"
PARALLEL = 16  # concurrent requests for many small objects (botocore's pool default is 10)
log = logging.getLogger(__name__)
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                    "RequestTimeout", "Throttling", "ThrottlingException"}


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not is_s3(uri):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, key = uri[len(S3_SCHEME):].partition("/")
        if not bucket:
            raise ValueError(f"s3 URI has no bucket: {uri!r}")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"


def join(base: str, *parts: str) -> str:
    """Join path pieces with '/' for URIs and os.path for local paths."""
    if is_s3(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(uri: str) -> str:
    if is_s3(uri):
        loc = S3Location.parse(uri)
        return f"{S3_SCHEME}{loc.bucket}/{posixpath.dirname(loc.key)}".rstrip("/")
    return os.path.dirname(os.path.abspath(uri))


@functools.lru_cache(maxsize=1)
def s3_client():
    """One boto3 client per process, configured from the environment."""
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        retries={"mode": "standard", "max_attempts": 2},  # the time budget is enforced by _retrying
        max_pool_connections=PARALLEL,  # journal reads, gallery pages and deletes go in parallel
        connect_timeout=float(os.environ.get("CAPTION_S3_CONNECT_TIMEOUT", "5")),
        read_timeout=float(os.environ.get("CAPTION_S3_READ_TIMEOUT", "60")),
        # Path-style addressing is what self-hosted endpoints (SeaweedFS, MinIO) expect.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        config=config,
    )


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; the one URI splitter (ValueError for anything else)."""
    loc = S3Location.parse(uri)
    return loc.bucket, loc.key


# -- the one S3 error classifier: every module asks these instead of reading botocore's codes ----------
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION_CODES = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
_DENIED_CODES = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "ExpiredToken", "InvalidToken"}


def error_code(err: BaseException) -> str:
    """botocore's error code of a ClientError (``""`` for anything else)."""
    response = getattr(err, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def is_transient(err: BaseException) -> bool:
    """Connection trouble, timeouts, 5xx and throttling: worth retrying."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(err, BotoConnectionError | HTTPClientError) or error_code(err) in _TRANSIENT_CODES


def is_precondition_failed(err: BaseException) -> bool:
    """A conditional request (If-None-Match / If-Match) lost: someone else's object is there."""
    return error_code(err) in _PRECONDITION_CODES


def is_access_denied(err: BaseException) -> bool:
    """Credentials or permissions: the environment's fault, never the data's."""
    return error_code(err) in _DENIED_CODES


_budget = threading.local()


@contextlib.contextmanager
def retry_budget(seconds: float | None):
    """Within the block, S3 operations of this thread start no retry later than ``seconds`` from now (None:
    no limit beyond ``CAPTION_S3_RETRY_SECONDS``). The publish fence uses it: a write that follows a lease
    check may retry only while the lease still runs."""
    outer = getattr(_budget, "deadline", None)
    deadline = None if seconds is None else time.monotonic() + max(0.0, seconds)
    if outer is not None and (deadline is None or outer < deadline):
        deadline = outer
    _budget.deadline = deadline
    try:
        yield
    finally:
        _budget.deadline = outer


def _retrying(fn):
    """Retry an S3 operation on transient errors with exponential backoff, within a time budget."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        budget = float(os.environ.get("CAPTION_S3_RETRY_SECONDS", "120"))
        deadline = time.monotonic() + budget
        fenced = getattr(_budget, "deadline", None)
        if fenced is not None:
            deadline = min(deadline, fenced)
        delay = 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if not is_transient(err) or time.monotonic() + delay > deadline:
                    raise
                log.warning("S3 %s failed (%s: %s); retrying in %.1fs", fn.__name__, type(err).__name__, err, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    return wrapper


def etag_of(response: dict) -> str | None:
    """The ETag of a listing entry or a HEAD/GET response, without its quotes (None if it has none)."""
    etag = str(response.get("ETag") or "").strip('"')
    return etag or None


def is_not_found(err: Exception) -> bool:
    """True for a missing local file or S3 object."""
    return isinstance(err, FileNotFoundError) or error_code(err) in _NOT_FOUND_CODES


@_retrying
def exists(uri: str) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    from botocore.exceptions import ClientError

    loc = S3Location.parse(uri)
    try:
        s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except ClientError as err:
        if is_not_found(err):
            return False
        raise


@_retrying
def check_readable(uri: str) -> None:
    """Raise what reading ``uri`` would raise (missing, forbidden, unreachable), reading no content."""
    if not is_s3(uri):
        with open(uri, "rb"):
            return
    loc = S3Location.parse(uri)
    s3_client().head_object(Bucket=loc.bucket, Key=loc.key)


@_retrying
def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    loc = S3Location.parse(uri)
    return s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()


@_retrying
def write_bytes(uri: str, data: bytes) -> None:
    """Replace the object atomically: readers see the old or the new content, never a partial one."""
    if is_s3(uri):
        loc = S3Location.parse(uri)
        s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)  # a single PUT is atomic
        return
    path = Path(uri)
    tmp = _durable_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _durable_temp(path: Path, data: bytes) -> Path:
    """``data`` written and fsynced to a hidden temp file beside ``path`` (same filesystem, for rename/link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


@_retrying
def put_if_absent(uri: str, data: bytes) -> bool:
    """Create the object only if nothing is there yet. Returns False if another object already exists there,
    True if we created it or it already holds exactly ``data`` (our own PUT whose response was lost).

    S3: a conditional PUT (``If-None-Match: *``). Local: write a temp file, then ``link`` it into place,
    which fails if the name exists. Either way the object appears whole or not at all.
    """
    if is_s3(uri):
        from botocore.exceptions import ClientError

        loc = S3Location.parse(uri)
        try:
            s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as err:
            if is_precondition_failed(err):
                # A retry after a lost response meets our own object: same content means it is ours.
                return _same_content(loc, data)
            raise
    path = Path(uri)
    tmp = _durable_temp(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return path.read_bytes() == data
    finally:
        tmp.unlink(missing_ok=True)


def _same_content(loc: S3Location, data: bytes) -> bool:
    """Whether the object holds exactly ``data``: by ETag (MD5 of a single-part PUT), else by content."""
    import hashlib

    etag = str(s3_client().head_object(Bucket=loc.bucket, Key=loc.key).get("ETag", "")).strip('"')
    if etag and "-" not in etag:
        return etag == hashlib.md5(data, usedforsecurity=False).hexdigest()
    return s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read() == data


@_retrying
def list_prefix(prefix: str) -> list[str]:
    """Every object/file whose URI starts with ``prefix`` (a directory for local paths), sorted."""
    if is_s3(prefix):
        loc = S3Location.parse(prefix)
        out: list[str] = []
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=loc.key):
            out.extend(f"{S3_SCHEME}{loc.bucket}/{obj['Key']}" for obj in page.get("Contents", []))
        return sorted(out)
    root = Path(prefix)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


@_retrying
def delete(uri: str) -> None:
    if is_s3(uri):
        loc = S3Location.parse(uri)
        s3_client().delete_object(Bucket=loc.bucket, Key=loc.key)
    else:
        Path(uri).unlink(missing_ok=True)


def write_many(objects: dict[str, bytes]) -> None:
    """``write_bytes`` for many objects at once, in parallel (a 10k-row gallery is 100 pages)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(PARALLEL, max(1, len(objects))), thread_name_prefix="s3-write") as pool:
        list(pool.map(lambda item: write_bytes(*item), objects.items()))


@_retrying
def delete_many(uris: list[str]) -> None:
    """Delete these objects/files (missing ones are fine): one request per 1,000 S3 keys."""
    s3 = [S3Location.parse(u) for u in uris if is_s3(u)]
    for uri in uris:
        if not is_s3(uri):
            Path(uri).unlink(missing_ok=True)
    for bucket in sorted({loc.bucket for loc in s3}):
        keys = [loc.key for loc in s3 if loc.bucket == bucket]
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})


@_retrying
def delete_prefix(prefix: str) -> None:
    if is_s3(prefix):
        loc = S3Location.parse(prefix)
        keys = [S3Location.parse(u).key for u in list_prefix(prefix)]
        for start in range(0, len(keys), 1000):
            chunk = keys[start:start + 1000]
            s3_client().delete_objects(Bucket=loc.bucket, Delete={"Objects": [{"Key": k} for k in chunk]})
    else:
        shutil.rmtree(prefix, ignore_errors=True)


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}


def service_answers(uri: str) -> bool:
    """Does the store holding ``uri`` work now, whatever it says about ``uri`` itself? Asked once, without the
    retry budget, after a row's read failed on an environment error: if the store answers, the row was tried
    against a working environment and the failure is the row's attempt; if not (connection refused, timeouts,
    5xx, credentials S3 does not accept), it is an outage, which is nobody's row attempt.

    S3: one listing of at most one key under the object's own key. Any answer from S3 with our valid
    credentials counts, a refusal too (an identity scoped to the object's prefix may not list). Local: the
    file's directory can be looked up (an ENOENT answer counts: the path is simply not there).
    """
    if not is_s3(uri):
        try:
            os.stat(os.path.dirname(os.path.abspath(uri)) or ".")
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True
    loc = S3Location.parse(uri)
    try:
        s3_client().list_objects_v2(Bucket=loc.bucket, Prefix=loc.key, MaxKeys=1)
    except Exception as err:
        code = error_code(err)
        return not (is_transient(err) or code in _CREDENTIAL_CODES or not code)
    return True


@_retrying
def check_local_file(path: str) -> None:
    """Raise what reading the local file ``path`` raises: FileNotFoundError only when it is not there (ENOENT),
    IsADirectoryError for a directory, and the real OSError (EACCES, ESTALE, EIO, ...) for trouble reading
    it, which is the environment's, not the video's (``errors.classify``)."""
    with open(path, "rb") as fh:
        fh.read(1)


def fetch_to_local(uri: str, cache_dir: str) -> tuple[str, bool, str]:
    """Return a local path for ``uri``: the path itself, or a fresh download into ``cache_dir``.

    The second value says whether the caller owns (and should delete) the returned file; the third is the
    identity of the bytes at that path: the ETag of the object downloaded (every GET of the transfer is
    conditional on the ETag its HEAD saw), or ``local:<size>:<mtime_ns>`` of a local file.
    """
    if not is_s3(uri):
        check_local_file(uri)
        st = os.stat(uri)
        return uri, False, f"local:{st.st_size}:{st.st_mtime_ns}"
    loc = S3Location.parse(uri)
    suffix = posixpath.splitext(loc.key)[1][:16]
    # The local name is random: nothing in the key (``..``, slashes, unicode) can steer it.
    local = os.path.join(cache_dir, f"{uuid.uuid4().hex}{suffix}")
    return local, True, _download(loc, local)


@_retrying
def _download(loc: S3Location, local: str) -> str:
    """One video into ``local``, retried like every other S3 call: a short outage must not turn a row
    transient. (The transfer writes a temporary name and renames, so a failed try leaves nothing at ``local``.)
    Returns the ETag of what was downloaded: boto3's transfer HEADs the object and makes each GET conditional
    on that ETag, so the bytes are that object's even if it is replaced meanwhile."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    with create_transfer_manager(s3_client(), TransferConfig()) as manager:
        future = manager.download(loc.bucket, loc.key, local)
        future.result()
        return etag_of({"ETag": future.meta.etag}) or ""
