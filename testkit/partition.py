"""Build meta partitions of synthetic clips on S3 (or locally) for tests, the demo and benchmarks."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from testkit.clips import ClipSpec, ensure_clip
from testkit.demo_clips import PARTITION_SPECS

META_COLUMNS = ("path", "num_frames", "fps", "height", "width", "aes")
#: the broken files of the mixed partition the msrun tests caption beside every clip of PARTITION_SPECS
MIXED_BROKEN = ("zero_byte", "truncated", "garbage", "audio_only", "not_video")


@dataclass(frozen=True)
class Row:
    path: str
    spec: ClipSpec | None  # None for a broken clip
    kind: str = "good"  # or a broken kind

    @property
    def expected_caption(self) -> str | None:
        return self.spec.caption if self.spec else None


def meta_csv(rows: list[Row]) -> bytes:
    """A meta CSV with the seed's columns; ``aes`` is a pass-through value tests check survives untouched."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(META_COLUMNS)
    for i, row in enumerate(rows):
        spec = row.spec
        if spec is None:
            writer.writerow([row.path, "", "", "", "", f"{i / 7:.6f}"])
        else:
            writer.writerow([row.path, spec.num_frames, spec.fps, spec.height, spec.width, f"{i / 7:.6f}"])
    return buf.getvalue().encode("utf-8")


def upload_partition(
    client, bucket: str, prefix: str, clips: list[tuple[Path, ClipSpec | None, str]], relative: bool = False
) -> tuple[str, list[Row]]:
    """Upload clips under ``s3://bucket/prefix/videos/`` and a meta CSV listing them.

    ``clips`` holds (local file, spec or None, kind). Returns the meta URI and its rows in order.
    With ``relative`` the meta lists keys relative to its own folder instead of full URIs.
    """
    rows = []
    for local, spec, kind in clips:
        key = f"{prefix}/videos/{Path(local).name}"
        client.upload_file(str(local), bucket, key)
        path = f"videos/{Path(local).name}" if relative else f"s3://{bucket}/{key}"
        rows.append(Row(path, spec, kind))
    meta_key = f"{prefix}/meta.csv"
    client.put_object(Bucket=bucket, Key=meta_key, Body=meta_csv(rows))
    return f"s3://{bucket}/{meta_key}", rows


def mixed_partition(directory: Path, broken: dict[str, Path]) -> list[tuple[Path, ClipSpec | None, str]]:
    """(file, spec or None, kind) of every PARTITION_SPECS clip (rendered into ``directory``) and the
    MIXED_BROKEN files of ``broken`` (``testkit.clips.broken_set``), interleaved so both ranks get some of each."""
    clips = [(ensure_clip(spec, directory), spec, "good") for spec in PARTITION_SPECS]
    clips += [(broken[kind], None, kind) for kind in MIXED_BROKEN]
    return clips[:5] + clips[10:12] + clips[5:10] + clips[12:]
