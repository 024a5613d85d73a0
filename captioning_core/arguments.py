"""The caption scripts' command line, derived from the option specs (options.py): ``RunConfig``'s fields for the
options every script shares, the captioner's ``options_cls`` for its own.

The ranks parse their argv with it (cli.py), the README's tables are generated from it (options_doc.py), and the
operator checks and fingerprints the argv it passes to msrun with it, in the Airflow worker. So it imports
argparse-level code only: no MindSpore, mindnlp, torch or transformers, and not cli.py (which runs a rank).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from captioning_core import options
from captioning_core.config import RunConfig
from captioning_core.options import Option


def command_line(model: str, environ: Mapping[str, str] | None = None) -> list[tuple[Option, Any]]:
    """Every option of ``caption_{model}`` in the parser's order, with its command-line default (``environ``:
    where environment defaults are read, ``os.environ`` unless given; ``{}`` gives the declared defaults)."""
    from captioning_core.models import captioner_class

    captioner = captioner_class(model)
    per_model = {o.name: getattr(captioner, o.model_default) for o in options.specs(RunConfig) if o.model_default}
    shared = options.command_line(RunConfig, environ=environ, overrides=per_model)
    own = options.command_line(captioner.options_cls, environ=environ) if captioner.options_cls else []
    return shared + own


def build_parser(model: str, environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The argparse parser of ``caption_{model}``."""
    parser = argparse.ArgumentParser(
        prog=f"caption_{model}",
        description=f"Caption every video of a meta partition with {model} (one process per msrun rank).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False)  # a prefix must not reach an option by another name (``--out`` for ``--output``)
    for opt, default in command_line(model, environ):
        options.add_argument(parser, opt, default)
    return parser


def config_from_args(model: str, args: argparse.Namespace) -> RunConfig:
    """The run configuration of parsed arguments; a bad value raises ValueError (the model's options first)."""
    from captioning_core.models import captioner_class

    captioner = captioner_class(model)
    model_options = captioner.options_from_args(args)
    cfg = RunConfig(model=model, **options.values(RunConfig, args), model_options=model_options)
    captioner.check_engine(cfg.engine)  # here too, so the operator refuses the argv before launching msrun
    return cfg


def owned_options() -> frozenset[str]:
    """The shared options the operator sets from its own arguments (``caption_options`` may not)."""
    return options.owned(RunConfig)


def for_script_args(model: str, script_args: list[str]) -> dict:
    """The fingerprint the ranks will record for ``caption_{model} *script_args`` (the caption script's argv
    after the program name), computed without importing any model runtime."""
    from captioning_core import fingerprint

    return fingerprint.compute(config_from_args(model, build_parser(model).parse_args(list(script_args))))
