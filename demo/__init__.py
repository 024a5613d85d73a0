"""The end-to-end demo (``python -m demo``)."""

import sys
from pathlib import Path

# Airflow puts the plugins folder on sys.path for DAGs and tasks; the demo imports the same modules directly.
_PLUGINS = str(Path(__file__).resolve().parents[1] / "plugins")
if _PLUGINS not in sys.path:
    sys.path.insert(0, _PLUGINS)
