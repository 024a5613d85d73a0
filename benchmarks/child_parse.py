"""Child of item 6: fill a DagBag from the DAG folder in a fresh interpreter (Airflow's one-time setup included).

    AIRFLOW_HOME=... python -m benchmarks.child_parse '{"dag_folder": ...}'

Prints one JSON line: the first fill's wall seconds, the sum of the per-file parse durations, import errors.
"""

from __future__ import annotations

import json
import sys
import time


def measure(dag_folder: str) -> dict:
    from airflow.dag_processing.dagbag import DagBag

    t = time.perf_counter()
    bag = DagBag(dag_folder=dag_folder)
    first = time.perf_counter() - t
    files = sum(s.duration.total_seconds() for s in bag.dagbag_stats)
    return {"first_fill": first, "files": files, "errors": len(bag.import_errors)}


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
