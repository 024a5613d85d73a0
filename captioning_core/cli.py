"""Command line of the caption scripts, seed-compatible (``caption_qwen2vl``, ``caption_pllava``), and
``caption.py MODEL`` for every registered captioner.

Runs the same way alone or under msrun, one process per rank::

    msrun --worker_num=2 --local_worker_num=2 --join=True --log_dir=msrun_log \\
        captioning_core/caption_qwen2vl.py /path/to/meta.csv
    msrun ... captioning_core/caption.py qwen2_5vl /path/to/meta.csv

Every default lives in one place: ``RunConfig`` for the shared options, each captioner's options dataclass
for its own (``option_defaults``); the parser, its ``--help`` and the README's tables (``options_markdown``,
checked by tests/test_cli.py) follow from them.

S3 endpoint and credentials are read from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY), never from argv. Exit codes: 0 done (this rank's rows are final; per-row data
failures are in the output), 2 bad input found before any model load, 3 rows left for the next attempt
after transient (environment) errors, with a one-line account in the log, or because the attempt lost the
partition lease the operator passed in ``CAPTION_LEASE`` (``lease_fence``: nothing is published then);
1 anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from captioning_core import storage
from captioning_core.config import DEVICE_TARGETS, DTYPES, GATHER_MODES, RunConfig
from captioning_core.lease_fence import LeaseFence, LeaseLostError
from captioning_core.sharding import rank_from_env

log = logging.getLogger("captioning_core.cli")

EXIT_BAD_INPUT = 2
EXIT_RETRY = 3


def _default(name: str):
    """The one source of an option's default: RunConfig's field."""
    return next(f.default for f in dataclasses.fields(RunConfig) if f.name == name)


def build_parser(model: str) -> argparse.ArgumentParser:
    from captioning_core.models import captioner_class

    parser = argparse.ArgumentParser(
        prog=f"caption_{model}",
        description=f"Caption every video of a meta partition with {model} (one process per msrun rank).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("meta_path", help="meta CSV with a 'path' column: local path or s3://bucket/key.csv")
    parser.add_argument("--pretrained_model_name_or_path", default=captioner_class(model).default_model_dir,
                        help="local model directory in Hugging Face format")
    parser.add_argument("--question", default=_default("question"), help="the caption prompt")
    parser.add_argument("--max_new_tokens", type=int, default=_default("max_new_tokens"),
                        help="caption length cap in tokens")
    parser.add_argument("--bs", type=int, default=_default("bs"),
                        help="most videos per generate call (default: no cap, --batch_tokens decides; "
                             "1 is the seed's one video per call)")
    parser.add_argument("--batch_tokens", type=int, default=_default("batch_tokens"),
                        help="most prefill tokens per generate call, video plus prompt, padding included; "
                             "prefetched videos are grouped by token count so a batch holds similar lengths "
                             "(a video over it still runs, alone)")
    parser.add_argument("--skip_if_existing", action="store_true",
                        help="exit at once, before loading any model, if the output already exists")
    parser.add_argument("--output", default=None,
                        help="output CSV (local or s3://); default {stem}_caption_{model}{ext} beside the input")
    parser.add_argument("--device_target", choices=DEVICE_TARGETS,
                        default=os.environ.get("CAPTION_DEVICE_TARGET", "Ascend"),
                        help="MindSpore device: Ascend, or CPU on machines without NPUs "
                             "(default from $CAPTION_DEVICE_TARGET, else Ascend)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights dtype (default float16 on Ascend, float32 on CPU)")
    parser.add_argument("--gather", choices=GATHER_MODES, default=_default("gather"),
                        help="'allgather' keeps the seed's path: token ids AllGathered, rank 0 writes")
    parser.add_argument("--pad_length", type=int, default=_default("pad_length"),
                        help="token-id row width for --gather allgather")
    parser.add_argument("--max_row_attempts", type=int, default=_default("max_row_attempts"),
                        help="a row that hit a transient (environment) error is retried by later attempts until "
                             "it has failed this many times; only then is it published as failed")
    parser.add_argument("--max_consecutive_errors", type=int, default=_default("max_consecutive_errors"),
                        help="stop this rank early after this many transient failures in a row")
    parser.add_argument("--video_root", default=None,
                        help="base for relative video paths (default: the meta file's directory)")
    parser.add_argument("--allowed_root", action="append", default=[], dest="allowed_roots",
                        help="only read videos under this local dir or s3:// prefix (repeatable)")
    parser.add_argument("--prefetch_workers", type=int, default=_default("prefetch_workers"),
                        help="background decode threads")
    parser.add_argument("--prefetch_batches", type=int, default=_default("prefetch_batches"),
                        help="batches decoded ahead of the model")
    parser.add_argument("--prefetch_bytes", type=int, default=_default("prefetch_bytes"),
                        help="most bytes of prepared tensors held ahead of the model (a 4K 10-minute clip at the "
                             "frame cap is ~0.6 GB of float32); one video over it is still prepared, alone")
    parser.add_argument("--journal_flush_rows", type=int, default=_default("journal_flush_rows"),
                        help="journal finished rows at least every this many rows (what a crash can lose)")
    parser.add_argument("--journal_flush_seconds", type=float, default=_default("journal_flush_seconds"),
                        help="... and at least every this many seconds")
    parser.add_argument("--log_every", type=float, default=_default("log_every"),
                        help="seconds between progress lines")
    captioner_class(model).add_arguments(parser)
    return parser


def config_from_args(model: str, args: argparse.Namespace) -> RunConfig:
    from captioning_core.models import captioner_class

    return RunConfig(
        meta_path=args.meta_path, model=model, pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        question=args.question, max_new_tokens=args.max_new_tokens, bs=args.bs, batch_tokens=args.batch_tokens,
        skip_if_existing=args.skip_if_existing, output=args.output, device_target=args.device_target,
        dtype=args.dtype, gather=args.gather, pad_length=args.pad_length,
        max_row_attempts=args.max_row_attempts, video_root=args.video_root, allowed_roots=args.allowed_roots,
        prefetch_workers=args.prefetch_workers, prefetch_batches=args.prefetch_batches,
        prefetch_bytes=args.prefetch_bytes, journal_flush_rows=args.journal_flush_rows,
        journal_flush_seconds=args.journal_flush_seconds, max_consecutive_errors=args.max_consecutive_errors,
        log_every=args.log_every, model_options=captioner_class(model).options_from_args(args))


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=os.environ.get("CAPTION_LOG_LEVEL", "INFO"), stream=sys.stdout, force=True,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None, model: str = "qwen2vl") -> int:
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return run_scheduler(argv, model)
    from captioning_core.faults import FaultPlan

    info = rank_from_env()
    setup_logging(info.rank)
    faults = FaultPlan.from_env(info.rank)
    faults.apply_to_environment()
    parser = build_parser(model)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(model, args)
    except ValueError as err:
        parser.error(str(err))
    try:
        if cfg.skip_if_existing and storage.exists(cfg.output):
            if not _replacement_to_finish(cfg):
                log.info("output exists, skipping: %s", cfg.output)
                if info.rank == 0:
                    _rebuild_beside(cfg)
                return 0
            cfg = dataclasses.replace(cfg, skip_if_existing=False)  # finish it: the publish replaces the output
        return run(cfg, info, faults)
    except LeaseLostError as err:  # another attempt holds the partition now; it publishes, not us
        log.error("%s", err)
        return EXIT_RETRY
    except Exception as err:
        from captioning_core.errors import TRANSIENT, classify

        if classify(err, "attempt") == TRANSIENT:
            log.error("attempt failed on an environment error, nothing published; the next attempt resumes: "
                      "%s: %s", type(err).__name__, err)
            return EXIT_RETRY
        raise


def _replacement_to_finish(cfg: RunConfig) -> bool:
    """The output exists, but a replacement with these very settings stopped before writing it (its summary
    is there, for other bytes): the output is not finished with these settings (``output_identity``)."""
    from captioning_core import fingerprint, publish

    if not publish.interrupted_replacement(cfg, fingerprint.compute(cfg)):
        return False
    log.warning("%s exists, but a replacement with these settings stopped before writing it (its summary "
                "names them, for other bytes): finishing that replacement", cfg.output)
    return True


def _rebuild_beside(cfg: RunConfig) -> None:
    """A skip that finds summary or gallery missing rebuilds them from the journal (no model is loaded)."""
    from captioning_core import fingerprint, publish

    try:
        publish.rebuild_beside(cfg, fingerprint.compute(cfg))
    except Exception as err:  # the output is there and final: a missing gallery never fails the skip
        log.warning("could not rebuild summary or gallery beside %s: %s: %s", cfg.output, type(err).__name__, err)


def run(cfg: RunConfig, info, faults=None) -> int:
    from captioning_core import runtime, signals
    from captioning_core.faults import FaultPlan
    from captioning_core.models import captioner_class
    from captioning_core.models.base import ModelDirError, check_model_dir
    from captioning_core.partition_table import PartitionError, read_partition
    from captioning_core.runner import RankRunner

    if "RANK_ID" in os.environ:
        signals.die_with_parent()
    signals.install_sigterm_handler()
    captioner_cls = captioner_class(cfg.model)
    try:
        read_partition(cfg.meta_path)
        check_model_dir(cfg.pretrained_model_name_or_path, captioner_cls.required_files)
    except (PartitionError, ModelDirError) as err:
        log.error("%s", err)
        return EXIT_BAD_INPUT
    log_settings(cfg, info)
    runtime.configure(cfg.device_target)
    faults = faults if faults is not None else FaultPlan.from_env(info.rank)
    stats = RankRunner(cfg, info, captioner_cls(cfg), faults, fence=LeaseFence.from_env()).run()
    log.info("rank stats %s", stats.to_dict())
    if stats.needs_retry:
        log.error("%s", stats.account())
        return EXIT_RETRY
    return 0


def log_settings(cfg: RunConfig, info) -> None:
    """What this rank runs with, as JSON: the configuration and the stage's own CAPTION_* environment.

    Credentials never appear here: they are read from AWS_* variables, which are not logged.
    """
    own_env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("CAPTION_")}
    log.info("rank %d/%d settings %s", info.rank, info.world_size,
             json.dumps({"config": dataclasses.asdict(cfg), "env": own_env}, ensure_ascii=False))


def run_scheduler(argv: list[str] | None, model: str) -> int:
    """msrun also starts the script as its scheduler process. Without a collective it has nothing to do;
    with ``--gather allgather`` it must join ``init()``, which serves the cluster until the workers finish."""
    args, _ = build_parser(model).parse_known_args(argv)
    if args.gather == "allgather":
        from captioning_core import runtime, signals

        signals.die_with_parent()
        runtime.setup_device(args.device_target)
        runtime.init_collective()
    return 0


def main_any(argv: list[str] | None = None) -> None:
    """``caption.py MODEL meta.csv [options]``: any registered captioner, named by the first argument."""
    from captioning_core.models import CAPTIONERS

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in CAPTIONERS:
        sys.stderr.write(f"usage: caption.py {{{','.join(sorted(CAPTIONERS))}}} meta_path [options]  "
                         f"(caption.py MODEL --help for the options)\n")
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(main(argv[1:], model=argv[0]))


def main_qwen2vl() -> None:
    sys.exit(main(model="qwen2vl"))


def main_pllava() -> None:
    sys.exit(main(model="pllava"))
