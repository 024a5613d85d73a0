"""Run configuration: the shared options' specs (``options.option`` fields) with the seed scripts' defaults,
validated in ``__post_init__``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from captioning_core import storage
from captioning_core.layout import PartitionLayout, default_output_name
from captioning_core.options import CHECKPOINT, DTYPE, GENERATION, PROMPT, SPEED, internal, option
from captioning_core.paths import check_root

DEVICE_TARGETS = ("Ascend", "CPU")
GATHER_MODES = ("none", "allgather")
DTYPES = ("float32", "float16", "bfloat16")
ENGINES = ("eager", "compiled")


@dataclass
class RunConfig:
    """What every captioner shares: the partition, where results go, batching, resume and devices.

    Each field is one option's spec (``options.option``): the caption scripts' arguments, the README's shared
    table, the fingerprint's roles and the operator's owned options are derived from these fields.
    """

    meta_path: str = option(help="meta CSV with a 'path' column: local path or s3://bucket/key.csv",
                            role=SPEED, positional=True, owned=True)
    model: str = internal()  # the caption script's captioner, not an option
    pretrained_model_name_or_path: str = option(help="local model directory in Hugging Face format",
                                                role=CHECKPOINT, by_content=True, owned=True,
                                                model_default="default_model_dir")
    question: str = option("Describe the video in details", help="the caption prompt", role=PROMPT)
    max_new_tokens: int = option(200, help="caption length cap in tokens", role=GENERATION)
    bs: int | None = option(None, role=SPEED,  # None: no cap, ``batch_tokens`` decides (1: the seed)
                            help="most videos per generate call (default: no cap, --batch_tokens decides; "
                                 "1 is the seed's one video per call)")
    batch_tokens: int = option(16384, role=SPEED,
                               help="most prefill tokens per generate call, video plus prompt, padding included; "
                                    "prefetched videos are grouped by token count so a batch holds similar "
                                    "lengths (a video over it still runs, alone)")
    skip_if_existing: bool = option(False, role=SPEED, owned=True,
                                    help="exit at once, before loading any model, if the output already exists")
    output: str | None = option(None, role=SPEED, owned=True,
                                help="output CSV (local or s3://); default {stem}_caption_{model}{ext} beside "
                                     "the input")
    device_target: str = option("Ascend", role=SPEED, choices=DEVICE_TARGETS, env="CAPTION_DEVICE_TARGET",
                                help="MindSpore device: Ascend, or CPU on machines without NPUs")
    dtype: str | None = option(None, role=DTYPE, choices=DTYPES,
                               help="weights dtype (default float16 on Ascend, float32 on CPU)")
    # speed-only: the compiled engine's greedy tokens equal eager mindnlp's and PyTorch's on every parity case
    # (tests/test_engine_qwen2vl.py, tests/test_engine_qwen3vl.py) and the caption script's captions are equal
    # (tests/test_engine_cli.py)
    engine: str = option("eager", role=SPEED, choices=ENGINES, model_default="default_engine",
                         help="how the model runs: 'eager' (mindnlp on MindSpore PyNative, the reference) or "
                              "'compiled' (MindSpore graphs, captioning_core.engine: Qwen2-VL, Qwen2.5-VL "
                              "and Qwen3-VL; refused for a model without one). Speed-only: both give the same greedy "
                              "tokens")
    gather: str = option("none", role=SPEED, choices=GATHER_MODES,
                         help="'allgather' keeps the seed's path: token ids AllGathered, rank 0 writes")
    pad_length: int = option(4096, help="token-id row width for --gather allgather", role=SPEED)
    max_row_attempts: int = option(3, role=SPEED,
                                   help="a row that hit a transient (environment) error is retried by later "
                                        "attempts until it has failed this many times; only then is it published "
                                        "as failed")
    max_consecutive_errors: int = option(8, role=SPEED,
                                         help="stop this rank early after this many transient failures in a row")
    video_root: str | None = option(None, role=SPEED,
                                    help="base for relative video paths (default: the meta file's directory)")
    allowed_roots: list[str] = option(default_factory=list, role=SPEED, flag="--allowed_root", owned=True,
                                      help="only read videos under this absolute local directory or "
                                           "s3://bucket/prefix (repeatable; none: any path a row names). The "
                                           "Airflow operator always sets it, from its allowed_roots")
    prefetch_workers: int = option(2, help="background decode threads", role=SPEED)
    decode_timeout: float = option(600.0, role=SPEED,
                                   help="seconds one video's decoding may take in its decoder process (0: no "
                                        "limit); a decode over it is killed and the row is transient, retried "
                                        "up to --max_row_attempts")
    max_decode_bytes: int = option(24 << 30, role=SPEED,
                                   help="most bytes of raw RGB frames one video's decoding may produce (frames x "
                                        "stored height x width x 3; 0: no cap); a video over it fails before "
                                        "decoding. The default holds the frame cap (768) of DCI 4K, 19 GiB")
    prefetch_batches: int = option(2, help="batches decoded ahead of the model", role=SPEED)
    prefetch_bytes: int = option(1 << 30, role=SPEED,  # one 4K 10-min clip ~0.6 GB
                                 help="most bytes of prepared tensors held ahead of the model (a 4K 10-minute "
                                      "clip at the frame cap is ~0.6 GB of float32); one video over it is still "
                                      "prepared, alone")
    journal_flush_rows: int = option(64, role=SPEED,  # crash-loss bound: at most this many finished rows ...
                                     help="journal finished rows at least every this many rows (what a crash "
                                          "can lose)")
    journal_flush_seconds: float = option(30.0, role=SPEED,  # ... or this many seconds of them
                                          help="... and at least every this many seconds")
    log_every: float = option(10.0, help="seconds between progress lines", role=SPEED)
    model_options: dict = internal(default_factory=dict)  # the captioner's options, from its options_cls

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
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if self.gather not in GATHER_MODES:
            raise ValueError(f"--gather must be one of {GATHER_MODES}, got {self.gather!r}")
        if self.bs is not None and int(self.bs) < 1:
            raise ValueError(f"--bs must be >= 1, got {self.bs!r}")
        for name in ("max_new_tokens", "batch_tokens", "pad_length", "max_row_attempts", "prefetch_workers",
                     "prefetch_batches", "prefetch_bytes", "journal_flush_rows", "max_consecutive_errors"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("journal_flush_seconds", "decode_timeout", "max_decode_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)!r}")
        if self.gather == "allgather" and self.pad_length < self.max_new_tokens:
            raise ValueError("--pad_length must be >= --max_new_tokens with --gather allgather")
        if not self.question.strip():
            raise ValueError("--question must not be empty")
        for root in self.allowed_roots:
            check_root(root)
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
