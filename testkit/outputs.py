"""Reading back what the caption stage wrote to S3, and the two checks tests make of its captions.

Every output is read the same way (all columns as strings, empty cells kept as ``""``), so a test compares
exactly the bytes the stage published.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from testkit.partition import Row


def read_csv_from_s3(client, uri: str) -> tuple[pd.DataFrame, bytes]:
    """The CSV at ``uri`` (``s3://bucket/key``) as strings, and its raw bytes."""
    import pandas as pd

    bucket, _, key = uri[len("s3://") :].partition("/")
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return pd.read_csv(io.BytesIO(body), dtype=str, keep_default_na=False), body


def read_output(client, uri: str) -> pd.DataFrame:
    """The CSV at ``uri`` (``s3://...`` through ``client``, or a local path) as strings."""
    if not uri.startswith("s3://"):
        import pandas as pd

        return pd.read_csv(uri, dtype=str, keep_default_na=False)
    return read_csv_from_s3(client, uri)[0]


def assert_row_captions(out: pd.DataFrame, rows: list[Row]) -> None:
    """Good clips captioned with what they show; broken ones failed with no text."""
    for row, (_, got) in zip(rows, out.iterrows(), strict=True):
        expected = ("ok", row.expected_caption) if row.spec else ("failed", "")
        assert (got["caption_status"], got["text"]) == expected


def assert_all_captioned(out: pd.DataFrame, rows: list[Row]) -> None:
    """Every row once, in input order, captioned with what its clip shows."""
    assert out["path"].tolist() == [r.path for r in rows]  # every row once, in input order
    assert out["caption_status"].tolist() == ["ok"] * len(rows)
    assert out["text"].tolist() == [r.expected_caption for r in rows]
