"""Child of items 1, 2 and 9: caption a meta CSV with the tiny Qwen2-VL, the runner's way or the seed's loop.

    python -m benchmarks.child_throughput '{"mode": "runner", "meta": ..., "model": ..., "out": ..., "bs": "4",
                                            "extra": [...]}'

Its own interpreter, so each side pays the same imports and model load and nothing else runs beside it.
Prints one JSON line: rows, wall seconds, busy fraction, decode seconds, generate calls (and more per mode).
"""

from __future__ import annotations

import json
import sys
import time


def measure(mode: str, meta: str, model: str, out: str, bs: str, extra: list[str]) -> dict:
    """``mode`` "runner": ``RankRunner`` (prefetch + batching); "seed": one video at a time, decode then
    generate, nothing overlapped."""
    from captioning_core import runtime

    runtime.setup_device("CPU")
    from captioning_core.cli import build_parser, config_from_args
    from captioning_core.models.qwen2_vl import Qwen2VLCaptioner
    from captioning_core.runner import RankRunner
    from captioning_core.sharding import RankInfo

    args = build_parser("qwen2vl").parse_args([meta, "--pretrained_model_name_or_path", model, "--output", out,
                                               "--bs", bs, *extra])
    cfg = config_from_args("qwen2vl", args)
    cap = Qwen2VLCaptioner(cfg)
    if mode == "runner":
        stats = RankRunner(cfg, RankInfo(0, 1), cap).run()
        return {"rows": stats.rows_processed, "wall": stats.wall_seconds, "busy": stats.busy_fraction,
                "decode": stats.decode_seconds, "calls": stats.generate_calls, "generate": stats.busy_seconds,
                "wait": stats.input_wait_seconds, "load": stats.load_seconds}
    import pandas as pd

    cap.setup()
    paths = pd.read_csv(meta)["path"].tolist()
    t0 = time.perf_counter()
    busy = 0.0
    texts = []
    for p in paths:
        item = cap.prepare(p)
        t = time.perf_counter()
        texts.append(cap.decode(cap.generate([item])[0]))
        busy += time.perf_counter() - t
    wall = time.perf_counter() - t0
    return {"rows": len(paths), "wall": wall, "busy": busy / wall, "decode": wall - busy, "calls": len(paths),
            "texts": texts}


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
