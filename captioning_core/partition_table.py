"""Read and validate a meta partition, merge captions back, and serialise the output table.

Every column is read as text and written back as read, so columns the stage does not own pass
through byte for byte (no float reformatting, no NaN for empty cells).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from captioning_core import storage
from captioning_core.output_identity import IDENTITY_COLUMN

# IDENTITY_COLUMN (``video_etag``, imported above): the identity of the bytes a row's result is for (S3 ETag;
# a local file's ``local:<size>:<mtime_ns>``). A meta that has the column names the identity each row must
# have (the curation DAG's shards do); the ranks then fail a row whose object is another one and ignore
# journal rows made for other bytes. Without it the output gets the column, filled with what was read.
PATH_COLUMN = "path"
TEXT_COLUMN = "text"
STATUS_COLUMN = "caption_status"
ERROR_COLUMN = "caption_error"
OWNED_COLUMNS = (TEXT_COLUMN, STATUS_COLUMN, ERROR_COLUMN)
STATUS_OK = "ok"
STATUS_FAILED = "failed"


class PartitionError(ValueError):
    """The partition as a whole cannot be captioned (raised before any model is loaded)."""


@dataclass(frozen=True)
class Partition:
    uri: str
    table: object  # pandas.DataFrame, all columns str

    @property
    def paths(self) -> list[str]:
        return self.table[PATH_COLUMN].tolist()

    @property
    def identities(self) -> list[str] | None:
        """Each row's expected identity (``""``: not named), or None when the meta has no identity column."""
        if IDENTITY_COLUMN not in self.table.columns:
            return None
        return self.table[IDENTITY_COLUMN].tolist()

    def __len__(self) -> int:
        return len(self.table)


def parse_table(data: bytes, uri: str = "<bytes>"):
    import pandas as pd

    if not uri.lower().endswith((".csv", ".csv.gz")) and uri != "<bytes>":
        raise PartitionError(f"{uri}: only CSV meta partitions are supported")
    if not data.strip():
        raise PartitionError(f"{uri}: the meta file is empty (no header)")
    try:
        table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False,
                            compression="gzip" if uri.endswith(".gz") else None)
    except Exception as err:
        raise PartitionError(f"{uri}: not a readable CSV: {err}") from err
    return table


def read_partition(uri: str) -> Partition:
    """Load a meta partition; raises PartitionError if it is missing or has no ``path`` column."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise PartitionError(f"meta file not found: {uri}") from err
    except Exception as err:
        if storage.is_not_found(err):
            raise PartitionError(f"meta object not found: {uri}") from err
        raise
    table = parse_table(data, uri)
    if PATH_COLUMN not in table.columns:
        raise PartitionError(f"{uri}: no '{PATH_COLUMN}' column (columns: {list(table.columns)})")
    return Partition(uri, table)


def merge_results(partition: Partition, results: dict) -> object:
    """The partition's rows, in order, with the caption columns set from ``results`` (row -> RowResult).

    Sets the columns on the partition's own table (no copy: a million-row table would double in memory).
    """
    table = partition.table
    texts, statuses, errors, identities = [], [], [], []
    for row in range(len(table)):
        res = results.get(row)
        if res is None:
            raise ValueError(f"row {row} has no result; refusing to publish an incomplete partition")
        texts.append(res.text if res.status == STATUS_OK else "")
        statuses.append(res.status)
        errors.append(res.error or "")
        identities.append(getattr(res, "video_etag", "") or "")
    table[TEXT_COLUMN] = texts
    table[STATUS_COLUMN] = statuses
    table[ERROR_COLUMN] = errors
    if IDENTITY_COLUMN not in table.columns:  # a meta's own column passes through (rows match it by now)
        table[IDENTITY_COLUMN] = identities
    return table


def serialise(table, uri: str) -> bytes:
    buf = io.BytesIO()
    table.to_csv(buf, index=False, compression="gzip" if uri.endswith(".gz") else None)
    return buf.getvalue()
