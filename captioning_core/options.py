"""One declarative spec per caption-script option, carried by the dataclass field that holds it.

An option used to be declared three times (the dataclass field, an ``add_argument`` call, a line of
``config_from_args``), its fingerprint role was a list of names in ``fingerprint.py``, and one default was read
from the environment inside argparse. Now the field says it once, as transformers' ``HfArgumentParser`` reads
help and choices from dataclass field metadata::

    top_p: float = option(1.0, help="nucleus sampling mass", role=GENERATION)

``RunConfig`` (config.py) declares the options every caption script shares; each captioner's options dataclass
(``Captioner.options_cls``) declares its own. Everything else is derived from those fields: the argparse
arguments (``add_arguments``, ``values``; arguments.py builds the whole parser), the README's option tables
(options_doc.py), the options the operator owns (``owned``) and which part of the fingerprint each value
belongs to (``Option.role``). A field of an options dataclass without a spec is an error, so no new option
lands in a part of the fingerprint by accident.

Roles, named after the fingerprint's parts (fingerprint.py):

- ``checkpoint``: which weights; a ``by_content`` path enters the fingerprint by its files, not its name
- ``prompt``: the text the model is asked
- ``generation``: how tokens are chosen (length, beams, temperature, seeds)
- ``sampling``: what the model sees of a video (frames, pixels)
- ``dtype``: the weights' dtype
- ``speed``: speed-only; how fast or where a run goes (input, output, devices, batching, retries), never
  the caption a row is meant to get; left out of the fingerprint

Environment defaults: an option's ``env`` names a variable that, when set, replaces its *command-line* default
(``Option.cli_default``, the one place it is read). A ``RunConfig`` built in code keeps the declared default,
and the README tables show the declared one. Only ``--device_target`` has one, ``$CAPTION_DEVICE_TARGET``: a
host without NPUs sets ``CPU`` once instead of every DAG passing it. Its help says so, generated from the spec.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

CHECKPOINT = "checkpoint"
PROMPT = "prompt"
GENERATION = "generation"
SAMPLING = "sampling"
DTYPE = "dtype"
SPEED = "speed"
ROLES = (CHECKPOINT, PROMPT, GENERATION, SAMPLING, DTYPE, SPEED)

MISSING = dataclasses.MISSING
_KEY = "captioning_core.option"  # the field metadata key holding an option's spec (None: not an option)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its field's name, type and default plus what the field's metadata declares."""

    name: str
    type: type  # what argparse converts a value to: int, float, str, bool (a flag), list (repeatable), ...
    default: Any  # MISSING: required
    help: str
    role: str
    choices: tuple | None = None
    owned: bool = False  # set by the operator from its own arguments; caption_options may not set it
    env: str | None = None  # environment variable that replaces the command-line default when set
    parse: Callable[[str], Any] | None = None  # argparse ``type`` when not ``type`` itself
    flag: str | None = None  # the command-line flag when not ``--name`` (e.g. ``--allowed_root``, repeatable)
    positional: bool = False
    by_content: bool = False  # a path: the fingerprint holds its files' identity, not the path
    model_default: str | None = None  # the Captioner attribute holding this option's command-line default

    @property
    def help_text(self) -> str:
        """The help, with the environment default spelled out where there is one."""
        if self.env:
            return f"{self.help} (default from ${self.env}, else {self.default})"
        return self.help

    @property
    def display_name(self) -> str:
        """How the command line spells it: ``meta_path`` (positional), ``--allowed_root``, ``--bs``."""
        return self.name if self.positional else self.flag or f"--{self.name}"

    def cli_default(self, environ: Mapping[str, str] | None = None) -> Any:
        """The command-line default: ``$env`` if set (``environ``, default ``os.environ``), else the declared one."""
        environ = os.environ if environ is None else environ
        if self.env and self.env in environ:
            return environ[self.env]
        return self.default


def option(default: Any = MISSING, *, help: str, role: str, default_factory: Any = MISSING,
           **spec: Any) -> Any:
    """A dataclass field that is a command-line option; ``spec`` takes the other ``Option`` attributes."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    unknown = set(spec) - {f.name for f in dataclasses.fields(Option)}
    if unknown:
        raise TypeError(f"unknown option attributes {sorted(unknown)}")
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_KEY: {"help": help, "role": role, **spec}})


def internal(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A dataclass field that the command line does not set (e.g. ``RunConfig.model``)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_KEY: None})


def inherit(base: type, name: str, default: Any) -> Any:
    """A subclass's field for the base's option ``name`` with another default (the same help and role)."""
    field = next(f for f in dataclasses.fields(base) if f.name == name)
    return dataclasses.field(default=default, metadata=field.metadata)


@functools.cache
def specs(cls: type) -> tuple[Option, ...]:
    """The options of a dataclass, in field order. A field without ``option()`` or ``internal()`` is an error."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        if _KEY not in field.metadata:
            raise TypeError(f"{cls.__name__}.{field.name} has no option spec: declare it with "
                            f"captioning_core.options.option(..., role=...) or internal()")
        meta = field.metadata[_KEY]
        if meta is None:
            continue
        default = field.default
        if field.default_factory is not MISSING:
            default = field.default_factory()
        out.append(Option(name=field.name, type=_value_type(hints[field.name]), default=default, **meta))
    return tuple(out)


def _value_type(hint: Any) -> type:
    """``int | None`` -> int, ``list[str]`` -> list, ``tuple[int, int, int]`` -> tuple."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def owned(cls: type) -> frozenset[str]:
    """The options of ``cls`` that the operator sets itself, by field name and, where its flag is spelled
    otherwise, by the flag's name too (``allowed_roots`` and ``allowed_root``: either key in a dict of options
    reaches the option)."""
    mine = [o for o in specs(cls) if o.owned]
    return frozenset({o.name for o in mine} | {o.flag.lstrip("-") for o in mine if o.flag})


def command_line(cls: type, *, environ: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> list[tuple[Option, Any]]:
    """Each option of ``cls`` with its command-line default: ``overrides``, else ``Option.cli_default``."""
    overrides = overrides or {}
    return [(o, overrides[o.name] if o.name in overrides else o.cli_default(environ)) for o in specs(cls)]


def add_argument(parser: argparse.ArgumentParser, opt: Option, default: Any) -> None:
    """``opt`` as an argparse argument with ``default``."""
    if opt.positional:
        parser.add_argument(opt.name, help=opt.help_text)
        return
    kwargs: dict[str, Any] = {"help": opt.help_text}
    if opt.flag:
        kwargs["dest"] = opt.name
    if opt.type is bool:
        kwargs.update(action="store_true", default=default)
    elif opt.type is list:
        kwargs.update(action="append", default=list(default))
    else:
        kwargs["default"] = default
        convert = opt.parse or (opt.type if opt.type in (int, float) else None)
        if convert is not None:
            kwargs["type"] = convert
        if opt.choices is not None:
            kwargs["choices"] = opt.choices
    parser.add_argument(opt.display_name, **kwargs)


def add_arguments(parser: argparse.ArgumentParser, cls: type, **kwargs: Any) -> None:
    """Every option of ``cls`` as an argparse argument (``kwargs``: those of ``command_line``)."""
    for opt, default in command_line(cls, **kwargs):
        add_argument(parser, opt, default)


def values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed value of every option of ``cls``, by field name (ready for ``cls(**values)``)."""
    return {o.name: getattr(args, o.name) for o in specs(cls)}
