"""The README's option tables, generated from the parsers: one source for every default and its meaning.

    python -m captioning_core.options_doc            # rewrite the tables in README.md
    python -m captioning_core.options_doc --check    # exit 1 if README.md differs (tests/test_cli.py runs this)

A table sits between ``<!-- options:NAME -->`` and ``<!-- /options -->`` in the README: ``shared`` holds the
options every caption script has; each group of captioners with the same own options gets one table, named
by its models joined with ``+`` (e.g. ``qwen2vl+qwen2_5vl``), with one default column per model.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from captioning_core.config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(<!-- options:([\w+]+) -->\n)(.*?)(<!-- /options -->)", re.S)
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)
                   if f.default is not dataclasses.MISSING}


def _actions(model: str) -> dict[str, argparse.Action]:
    from captioning_core.cli import build_parser

    return {a.dest: a for a in build_parser(model)._actions if a.dest != "help"}


def _default(action: argparse.Action) -> str:
    value = _FIELD_DEFAULTS.get(action.dest, action.default)  # not $CAPTION_DEVICE_TARGET of this shell
    if isinstance(action, argparse._StoreTrueAction):
        return "on" if value else "off"
    if value is None or value == [] or action.default is argparse.SUPPRESS:
        return ""
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value)
    return f"`{value}`" if isinstance(value, str) else str(value)


def _name(action: argparse.Action) -> str:
    return f"`{action.option_strings[0] if action.option_strings else action.dest}`"


def _meaning(action: argparse.Action) -> str:
    return (action.help or "").replace("|", "\\|")


def tables() -> dict[str, str]:
    """Table name -> markdown table."""
    from captioning_core.models import CAPTIONERS

    per_model = {m: _actions(m) for m in CAPTIONERS}
    shared = set.intersection(*(set(a) for a in per_model.values())) - {"pretrained_model_name_or_path"}
    first = per_model[next(iter(CAPTIONERS))]
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    rows += [f"| {_name(a)} | {_default(a)} | {_meaning(a)} |" for dest, a in first.items() if dest in shared]
    out = {"shared": "\n".join(rows)}
    groups: dict[tuple[str, ...], list[str]] = {}
    for model, actions in per_model.items():
        own = tuple(dest for dest in actions if dest not in shared)
        groups.setdefault(own, []).append(model)
    for own, models in groups.items():
        head = "| argument | " + " | ".join(f"{m} default" for m in models) + " | meaning |"
        rows = [head, "|---|" + "---|" * len(models) + "---|"]
        for dest in own:
            defaults = " | ".join(_default(per_model[m][dest]) for m in models)
            rows.append(f"| {_name(per_model[models[0]][dest])} | {defaults} | {_meaning(per_model[models[0]][dest])} |")
        out["+".join(models)] = "\n".join(rows)
    return out


def render(text: str) -> str:
    """``text`` with every options block replaced by its generated table; an unknown block name fails."""
    generated = tables()

    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in generated:
            raise KeyError(f"README options block {name!r} has no table; known: {sorted(generated)}")
        return f"{match.group(1)}{generated[name]}\n{match.group(4)}"

    missing = set(generated) - {m.group(2) for m in _BLOCK.finditer(text)}
    if missing:
        raise KeyError(f"README lacks options blocks for {sorted(missing)}")
    return _BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's tables are out of date")
    parser.add_argument("--readme", default=str(README))
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            sys.stderr.write(f"{path.name}: option tables are out of date; run python -m captioning_core.options_doc\n")
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
