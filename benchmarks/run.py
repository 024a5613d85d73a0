"""Side-by-side benchmarks of the caption stage; prints one table of measured ratios.

    make bench                      # or: .venv/bin/python -m benchmarks.run [--only 3,4,5,6]

Each comparison runs both sides in this one invocation, on the same clips and the same tiny model, so the
ratio holds even when the machine's speed drifts. Targets come from the performance issue; a miss is
printed as such, never hidden.

1. partition throughput: the runner (prefetch + batching) vs a seed-style loop (bs 1, decode then generate)
2. model-busy fraction of the runner (time inside generate / wall time after model load), also in a
   decode-heavy configuration where decoding a video costs about what one generate call does
3. frame sampling on 60 s clips: our read_frames vs decord get_batch / skip_frames, PyAV seek / decode
   forward, and vs decoding every frame (decord 0.6.0 is not here: it installs the same `decord`
   module as decord2, so the two cannot be installed side by side)
   (8 below is a sampling item too)
4. resume and publish of a 10,000-row partition journaled the way the runner writes it at --bs 1, on the
   SeaweedFS server, vs the one-object-per-row journal it replaced
5. a 1,000,000-row partition: shard + merge + write, peak RSS and time
6. DAG folder parse time
7. 2 msrun workers vs 1 on this machine
8. cost of display handling (orientation, SAR, time-based VFR sampling) on upright CFR clips: the full
   sampling path vs the same decoder without it, side by side; and what a rotated clip costs
9. batching by token budget (the default) on 64 clips of 2-20 s vs the seed-style loop at bs 1, the share
   of prefill tokens that is padding, and the runner's output tokens/s vs the model alone generating the
   same prepared batches back to back
10. msrun's join loop: its CPU use with msrun as it is vs the hook's SCHED_IDLE join, and the ranks' rows/s
11. released layouts at real size (opt-in, heavy: `--only 11`): a random-weight checkpoint with the exact
   released config of Qwen2-VL-2B-Instruct / Qwen2.5-VL-3B-Instruct (`--realsize`), bf16 sharded safetensors
   as released, loaded through the production captioner under mindnlp on CPU, one 8-token generate on a short
   clip per `--dtypes` entry: load seconds, peak RSS vs the weights' bytes, which dtypes MindSpore's CPU runs
12. a rank's start-up: ``runtime.import_mindnlp()`` vs a plain ``import mindnlp`` (fresh interpreters)
13. the checkpoint fingerprint (every byte hashed) on ``--fingerprint_gib`` GiB of sharded safetensors: first read
   with a cold page cache, first read warm, and with the host's cached digests, extrapolated to 15 GB; and
   SHA-256 vs BLAKE2b throughput

Item N's code is in ``benchmarks/item_*.py``; what must run in a fresh interpreter (for its timing, imports
or peak memory) is a child module ``benchmarks/child_*.py``, started by ``benchmarks.children``.
"""

from __future__ import annotations

import argparse
import inspect
import resource
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.item_decode_sandbox import bench_decode_sandbox
from benchmarks.item_display import bench_display_overhead
from benchmarks.item_fingerprint import bench_fingerprint
from benchmarks.item_join_loop import bench_join_loop
from benchmarks.item_million import bench_million
from benchmarks.item_parse import bench_parse
from benchmarks.item_rank_import import bench_rank_import
from benchmarks.item_realsize import bench_realsize
from benchmarks.item_resume import bench_resume
from benchmarks.item_sampling import bench_sampling
from benchmarks.item_throughput import bench_throughput
from benchmarks.item_token_budget import bench_token_budget
from benchmarks.item_workers import bench_workers
from testkit.paths import REPO

sys.path.insert(0, str(REPO / "plugins"))  # items 7 and 10 drive operators.msrun_hook

BENCHES = {1: bench_throughput, 3: bench_sampling, 4: bench_resume, 5: bench_million, 6: bench_parse,
           7: bench_workers, 8: bench_display_overhead, 9: bench_token_budget,
           10: bench_join_loop, 11: bench_realsize, 12: bench_rank_import, 13: bench_fingerprint,
           14: bench_decode_sandbox}
OPT_IN = {11}  # heavy (GBs of checkpoint and RAM, minutes): only with --only


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark numbers (2 comes with 1)")
    parser.add_argument("--realsize", default="qwen2vl-2b",
                        help="item 11: comma-separated released layouts (qwen2vl-2b, qwen2_5vl-3b)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32", help="item 11: dtypes to load and run")
    parser.add_argument("--fingerprint_gib", type=float, default=4.0,
                        help="item 13: GiB of checkpoint shards to write (in the temp dir, deleted after)")
    args = parser.parse_args()
    chosen = [int(x) for x in args.only.split(",") if x] or sorted(set(BENCHES) - OPT_IN)
    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        for number in chosen:
            print(f"[{number}] {BENCHES[number].__name__}", flush=True)  # noqa: T201
            work = Path(tmp) / str(number)
            work.mkdir(parents=True)
            bench = BENCHES[number]
            wanted = inspect.signature(bench).parameters  # item-specific options, by keyword
            bench(work, **{k: v for k, v in vars(args).items() if k in wanted})
    print("\n| benchmark | measured | target | verdict |\n|---|---|---|---|")  # noqa: T201
    for row in RESULTS:
        print("| " + " | ".join(row) + " |")  # noqa: T201
    print(f"\npeak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
