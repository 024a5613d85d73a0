"""The drill DAG (tests/airflow_dags/caption_drill.py) as the Airflow-level drills drive it.

Its one AscendCaptionOperator takes every templated field from the run's params, so each drill controls the
task from outside exactly as a user would: with the run conf built here. Each try's ranks log to a directory of
their own, which is how a drill tells try 1 from try 2.
"""

from __future__ import annotations

from pathlib import Path

from testkit.airflow_env import TINY_CAPTION_OPTIONS
from testkit.paths import REPO

DAG_ID = "caption_drill"
DAGS = REPO / "tests" / "airflow_dags"
DATE = "2026-11-21"


def drill_conf(meta: str, output: str, **overrides) -> dict:
    """The run conf of one drill: the tiny profile's caption options on ``meta``, written to ``output``."""
    return {"meta_path": meta, "output_uri": output, "caption_options": dict(TINY_CAPTION_OPTIONS), **overrides}


def rank_lines(root: Path, pattern: str) -> dict[str, list[str]]:
    """Rank log lines per log directory (one directory per try), for lines containing ``pattern``."""
    found: dict[str, list[str]] = {}
    for log in sorted(root.rglob("worker_*.log")):
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if pattern in ln]
        found.setdefault(log.parent.name, []).extend(lines)
    return found
