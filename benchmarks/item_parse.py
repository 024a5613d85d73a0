"""Item 6: the DAG folder's parse time, in fresh interpreters (``benchmarks.child_parse``)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.children import run_child
from benchmarks.common import report
from testkit.paths import REPO


def bench_parse(work: Path) -> None:
    env = {"AIRFLOW_HOME": str(work / "af"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins")}
    runs = [run_child("child_parse", {"dag_folder": str(REPO / "dags")}, env) for _ in range(3)]
    files = min(r["files"] for r in runs)
    first = min(r["first_fill"] for r in runs)
    report("6 DAG folder parse (all DAG files, fresh interpreter)", f"{files:.3f}s; first DagBag fill incl. "
           f"Airflow's one-time plugin/config setup {first:.2f}s", "<= 0.5 s", files <= 0.5)
