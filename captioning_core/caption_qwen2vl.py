"""msrun entry script for Qwen2-VL under the seed's name: ``caption.py qwen2vl`` with the model fixed.

``msrun ... captioning_core/caption_qwen2vl.py meta.csv [options]`` (or ``python -m captioning_core.caption_qwen2vl``).
"""

import os
import runpy
import sys

if __name__ == "__main__":
    sys.argv[1:1] = ["qwen2vl"]
    here = os.path.dirname(os.path.abspath(__file__))
    runpy.run_path(os.path.join(here, "caption.py"), init_globals={"ENTRY_SCRIPT": __file__}, run_name="__main__")
