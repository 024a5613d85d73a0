"""msrun entry script for PLLaVA: ``msrun ... captioning_core/caption_pllava.py meta.csv [options]``."""

import os
import sys

if __name__ == "__main__":
    # Run by path, Python puts this package's own folder first on sys.path; drop it so that module
    # names here (config, video, ...) can never shadow other top-level modules.
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    from captioning_core.cli import main_pllava

    main_pllava()
