"""The one data-vs-environment policy: what an error means for a row, a rank and an attempt.

**What `failed` means.** A row is `failed` for a *data* reason, and that is final: the file is empty,
undecodable or has no video stream, it is not there ("video not found": ENOENT or S3's 404 only), it is a
directory, or its path is outside the allowed roots. A local file that exists but cannot be read (EACCES, ESTALE,
EIO: a permission, a stale mount, a failing disk) is the environment's. Anything the *environment* caused (S3 errors after the client's retries, wrong credentials,
network, an error raised by the model runtime, out-of-memory after the row-by-row retry) is *transient*: the
row is journaled as such, the partition is **not** published, and the script exits 3 with a one-line account
per rank (rows left, last error), so the next attempt (the Airflow retry) redoes exactly those rows. Only a
row that has failed transiently `--max_row_attempts` times (default 3) is published as `failed`
("gave up after N attempts: ..."). A rank that meets `--max_consecutive_errors` (default 8) transient
failures in a row stops early, and a rank checks it can read its first pending video before loading the model.
An outage is no row's attempt: a row whose read failed while the store itself did not answer
(``storage.service_answers``) is journaled nowhere and the rank stops (``RankRunner._stop_for_outage``).

An error of the whole attempt (outside any row) is transient if S3 or its credentials caused it (exit 3, the
next attempt resumes) and otherwise *fatal*: it is raised, a bug or a broken input to look at. The S3 error
codes themselves live in :mod:`captioning_core.storage`.
"""

from __future__ import annotations

import re

from captioning_core import storage

DATA = "data"  # the row's own problem: final
TRANSIENT = "transient"  # the environment's: the row (or attempt) is retried by the next attempt
FATAL = "fatal"  # outside any row and not the environment's: raised

#: where an error happened. Row stages: ``path`` (resolving it), ``fetch`` (reading the bytes), ``decode``
#: (decoding and preprocessing), ``preflight`` (a rank's check that it can read its first pending video, before
#: the model loads), ``generate`` (the model runtime, on one row alone). ``attempt``: anywhere else in a rank.
ROW_STAGES = ("path", "fetch", "decode", "preflight", "generate")
STAGES = (*ROW_STAGES, "attempt")

_OOM = re.compile(r"out of memory|allocate memory|memory allocation|\bOOM\b", re.IGNORECASE)


class TransientError(Exception):
    """Raised by this project's own code for a failure the environment caused (e.g. the decoder process was
    killed or overran its time): transient at any row stage."""


def is_oom(err: BaseException) -> bool:
    """Out of memory, host or device (the runtimes say so in their messages)."""
    return isinstance(err, MemoryError) or bool(_OOM.search(str(err)))


def short_error(err: BaseException, limit: int = 500) -> str:
    """``Type: message``, cut to ``limit`` characters: what a row's result and the logs record."""
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _s3_environment(err: BaseException) -> bool:
    return storage.is_transient(err) or storage.is_access_denied(err)


class VideoChangedError(Exception):
    """The object at a row's path is not the one its meta row names (``video_etag``): it was replaced after
    the meta was written. The row's data, final: the registry's next scrape re-queues the new bytes."""


def classify(error: BaseException, stage: str) -> str:
    """``DATA``, ``TRANSIENT`` or ``FATAL`` for ``error`` raised at ``stage`` (one of ``STAGES``)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    if stage == "attempt":
        return TRANSIENT if _s3_environment(error) else FATAL
    if stage == "generate":  # the model runtime failed on this row alone: the environment's fault
        return TRANSIENT
    if isinstance(error, TransientError):
        return TRANSIENT
    if isinstance(error, IsADirectoryError | NotADirectoryError | VideoChangedError):  # not this row's file
        return DATA
    environment = _s3_environment(error) or isinstance(error, PermissionError)
    if stage == "preflight":  # anything else (not there, a directory, ...) is left for the row's own stages
        return TRANSIENT if environment else DATA
    if storage.is_not_found(error):  # only ENOENT / S3 404 mean "not there"; EACCES, ESTALE, EIO do not
        return DATA
    return TRANSIENT if stage == "fetch" or environment or is_oom(error) else DATA
