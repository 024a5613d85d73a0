"""msrun entry script for PLLaVA under the seed's name: ``caption.py pllava`` with the model fixed.

``msrun ... captioning_core/caption_pllava.py meta.csv [options]`` (or ``python -m captioning_core.caption_pllava``).
"""

import os
import runpy
import sys

if __name__ == "__main__":
    sys.argv[1:1] = ["pllava"]
    here = os.path.dirname(os.path.abspath(__file__))
    runpy.run_path(os.path.join(here, "caption.py"), init_globals={"ENTRY_SCRIPT": __file__}, run_name="__main__")
