"""msrun entry script for any registered captioner: ``msrun ... captioning_core/caption.py MODEL meta.csv [options]``.

MODEL is a name from ``captioning_core.models.CAPTIONERS`` (qwen2vl, qwen2_5vl, pllava, ...); the seed-named
scripts beside this one (caption_qwen2vl.py, caption_pllava.py) run this one with the model fixed.

msrun starts every worker with the ``python`` found on PATH, not necessarily the one msrun itself runs under;
if that Python lacks this package or a dependency, say which Python it was and what is missing, instead of a
bare ModuleNotFoundError on every rank.
"""

import os
import sys

if __name__ == "__main__":
    parent_at_start = os.getppid()  # before anything slow: msrun may die while we start
    # Run by path, Python puts this package's own folder first on sys.path; drop it so that module
    # names here (config, video, ...) can never shadow other top-level modules.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    try:
        from captioning_core import signals

        if signals.started_by_msrun():  # before the heavy imports and the first S3 call
            signals.tie_to_parent(parent_at_start)
        from captioning_core.cli import main_any

        main_any()
    except ModuleNotFoundError as err:  # only the environment can cause this: name it
        raise SystemExit(
            f"{os.path.basename(globals().get('ENTRY_SCRIPT', __file__))}: cannot import {err.name!r} under {sys.executable} "
            f"(Python {sys.version.split()[0]}). msrun starts each worker with the 'python' found on PATH: "
            "activate the environment where ascend-caption is installed (e.g. '. .venv/bin/activate') or "
            "put its bin directory first on PATH, then run msrun again."
        ) from None
