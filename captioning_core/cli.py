"""Command line of the caption scripts, seed-compatible (``caption_qwen2vl``, ``caption_pllava``), and
``caption.py MODEL`` for every registered captioner.

Runs the same way alone or under msrun, one process per rank::

    msrun --worker_num=2 --local_worker_num=2 --join=True --log_dir=msrun_log \\
        captioning_core/caption_qwen2vl.py /path/to/meta.csv
    msrun ... captioning_core/caption.py qwen2_5vl /path/to/meta.csv

Every option is declared once, as a field with its spec (options.py): ``RunConfig`` for the shared options, each
captioner's options dataclass for its own. The parser (arguments.py, re-exported here as ``build_parser`` and
``config_from_args``), its ``--help`` and the README's tables (options_doc.py, checked by tests/test_cli.py)
follow from them.

S3 endpoint and credentials are read from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY), never from argv. Exit codes: 0 done (this rank's rows are final; per-row data
failures are in the output), 2 bad input found before any model load, 3 rows left for the next attempt
after transient (environment) errors, with a one-line account in the log, or because the attempt lost the
partition lease the operator passed in ``CAPTION_LEASE`` (``lease_fence``: nothing is published then);
1 anything else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

from captioning_core import storage
from captioning_core.arguments import build_parser, config_from_args
from captioning_core.config import RunConfig
from captioning_core.lease_fence import LeaseFence, LeaseLostError
from captioning_core.sharding import rank_from_env

log = logging.getLogger("captioning_core.cli")

EXIT_BAD_INPUT = 2
EXIT_RETRY = 3


#: libraries whose DEBUG records carry credentials (botocore logs each request's headers: the
#: Authorization header names the access key id, X-Amz-Security-Token is the session token)
CREDENTIAL_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")


def setup_logging(rank: int) -> None:
    """Log to stdout at ``CAPTION_LOG_LEVEL`` (INFO by default); the credential-carrying libraries never below
    INFO, whatever the level, so a DEBUG run logs no key id or token."""
    logging.basicConfig(level=os.environ.get("CAPTION_LOG_LEVEL", "INFO"), stream=sys.stdout, force=True,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    for name in CREDENTIAL_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))


def main(argv: list[str] | None = None, model: str = "qwen2vl") -> int:
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        return run_scheduler(argv, model)
    from captioning_core.faults import FaultPlan

    info = rank_from_env()
    setup_logging(info.rank)
    faults = FaultPlan.from_env(info.rank)
    faults.apply_to_environment()
    faults.report_reach()
    parser = build_parser(model)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(model, args)
    except ValueError as err:
        parser.error(str(err))
    try:
        if cfg.skip_if_existing and storage.exists(cfg.output):
            if not _replacement_to_finish(cfg) and not _videos_replaced(cfg):
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


def _videos_replaced(cfg: RunConfig) -> bool:
    """The output exists, but some of its rows were made for other videos than the meta names now (their
    ``video_etag`` changed): not finished; those rows are captioned again, the rest come from the journal."""
    from captioning_core import output_identity

    changed = output_identity.changed_rows(storage.read_bytes(cfg.meta_path), storage.read_bytes(cfg.output),
                                           cfg.meta_path, cfg.output)
    if changed:
        log.warning("%s exists, but %d of its rows were made for other videos than %s names now (first: row "
                    "%d): captioning those again", cfg.output, len(changed), cfg.meta_path, changed[0])
    return bool(changed)


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
