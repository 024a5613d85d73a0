"""Run configuration: dataclasses with the seed scripts' defaults, validated in ``__post_init__``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from captioning_core import storage
from captioning_core.layout import PartitionLayout, default_output_name

DEVICE_TARGETS = ("Ascend", "CPU")
GATHER_MODES = ("none", "allgather")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class RunConfig:
    """What every captioner shares: the partition, where results go, batching, resume and devices."""

    meta_path: str
    model: str
    pretrained_model_name_or_path: str
    question: str = "Describe the video in details"
    max_new_tokens: int = 200
    bs: int | None = None  # most videos per generate call; None: no cap, ``batch_tokens`` decides (1: the seed)
    batch_tokens: int = 16384  # most prefill tokens per generate call (videos + prompts, padding included)
    skip_if_existing: bool = False
    output: str | None = None
    device_target: str = "Ascend"
    dtype: str | None = None
    gather: str = "none"
    pad_length: int = 4096
    max_row_attempts: int = 3
    video_root: str | None = None
    prefetch_workers: int = 2
    prefetch_batches: int = 2
    prefetch_bytes: int = 1 << 30  # prepared tensors held ahead of the model (one 4K 10-min clip ~0.6 GB)
    journal_flush_rows: int = 64  # crash-loss bound: at most this many finished rows ...
    journal_flush_seconds: float = 30.0  # ... or this many seconds of finished rows are lost to a crash
    max_consecutive_errors: int = 8  # transient failures in a row that stop a rank early
    log_every: float = 10.0
    allowed_roots: list[str] = field(default_factory=list)
    model_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.meta_path:
            raise ValueError("meta_path is required")
        if not self.pretrained_model_name_or_path:
            raise ValueError("--pretrained_model_name_or_path is required")
        if self.device_target not in DEVICE_TARGETS:
            raise ValueError(f"--device_target must be one of {DEVICE_TARGETS}, got {self.device_target!r}")
        if self.dtype is None:
            self.dtype = "float16" if self.device_target == "Ascend" else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.gather not in GATHER_MODES:
            raise ValueError(f"--gather must be one of {GATHER_MODES}, got {self.gather!r}")
        if self.bs is not None and int(self.bs) < 1:
            raise ValueError(f"--bs must be >= 1, got {self.bs!r}")
        for name in ("max_new_tokens", "batch_tokens", "pad_length", "max_row_attempts", "prefetch_workers",
                     "prefetch_batches", "prefetch_bytes", "journal_flush_rows", "max_consecutive_errors"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)!r}")
        if self.journal_flush_seconds < 0:
            raise ValueError(f"--journal_flush_seconds must be >= 0, got {self.journal_flush_seconds!r}")
        if self.gather == "allgather" and self.pad_length < self.max_new_tokens:
            raise ValueError("--pad_length must be >= --max_new_tokens with --gather allgather")
        if not self.question.strip():
            raise ValueError("--question must not be empty")
        if self.output is None:
            self.output = default_output(self.meta_path, self.model)

    @property
    def layout(self) -> PartitionLayout:
        """The objects beside the output: summary, gallery, journal parts and stats, lease."""
        return PartitionLayout(str(self.output))


def default_output(meta_path: str, model: str) -> str:
    """The seed's naming: ``{stem}_caption_{model}{ext}`` beside the input."""
    stem, ext = os.path.splitext(meta_path)
    if storage.is_s3(meta_path) and "/" not in meta_path[len(storage.S3_SCHEME):]:
        raise ValueError(f"meta path has no key: {meta_path!r}")
    return default_output_name(stem, model, ext)
