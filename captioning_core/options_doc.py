"""The README's option tables, generated from the option specs (options.py): one source for every default and
its meaning.

    python -m captioning_core.options_doc            # rewrite the tables in README.md
    python -m captioning_core.options_doc --check    # exit 1 if README.md differs (tests/test_cli.py runs this)

A table sits between ``<!-- options:NAME -->`` and ``<!-- /options -->`` in the README: ``shared`` holds the
options every caption script has; each group of captioners with the same own options gets one table, named
by its models joined with ``+`` (e.g. ``qwen2vl+qwen2_5vl``), with one default column per model.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from captioning_core.options import Option

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(<!-- options:([\w+]+) -->\n)(.*?)(<!-- /options -->)", re.S)


def _options(model: str) -> dict[str, tuple[Option, Any]]:
    """The script's options with their declared defaults (no environment: ``environ={}``)."""
    from captioning_core.arguments import command_line

    return {opt.name: (opt, default) for opt, default in command_line(model, environ={})}


def _default(entry: tuple[Option, Any]) -> str:
    opt, value = entry
    if opt.type is bool:
        return "on" if value else "off"
    if value is None or value == [] or opt.positional:
        return ""
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value)
    return f"`{value}`" if isinstance(value, str) else str(value)


def _name(entry: tuple[Option, Any]) -> str:
    return f"`{entry[0].display_name}`"


def _meaning(entry: tuple[Option, Any]) -> str:
    return entry[0].help_text.replace("|", "\\|")


def tables() -> dict[str, str]:
    """Table name -> markdown table."""
    from captioning_core.models import CAPTIONERS

    per_model = {m: _options(m) for m in CAPTIONERS}
    per_model_default = {o.name for o, _ in per_model[next(iter(CAPTIONERS))].values() if o.model_default}
    shared = set.intersection(*(set(a) for a in per_model.values())) - per_model_default
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
