"""Child of item 5: shard, merge and write a 1,000,000-row partition; its time and its own peak RSS.

    python -m benchmarks.child_million '{"meta": ..., "out": ...}'

Peak RSS is read as VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over exec, so it would report the
driver's peak. The clock starts before captioning_core is imported, as a rank's would.
"""

from __future__ import annotations

import json
import sys
import time


def measure(meta: str, out: str) -> dict:
    t0 = time.perf_counter()
    from captioning_core import partition_table, sharding
    from captioning_core.journal import RowResult

    part = partition_table.read_partition(meta)
    shards = [sharding.rows_for_rank(len(part), sharding.RankInfo(r, 8)) for r in range(8)]
    paths = part.paths
    results = {i: RowResult(i, paths[i], "ok", "a red square moves left") for s in shards for i in s}
    body = partition_table.serialise(partition_table.merge_results(part, results), out)
    with open(out, "wb") as fh:
        fh.write(body)
    seconds = time.perf_counter() - t0
    with open("/proc/self/status") as fh:
        hwm_kib = int(next(line for line in fh if line.startswith("VmHWM")).split()[1])
    return {"seconds": seconds, "rss_mib": hwm_kib / 1024}


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
