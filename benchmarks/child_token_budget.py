"""Child of item 9: the runner's default (batches by token budget), then the model alone on the same batches.

    python -m benchmarks.child_token_budget '{"meta": ..., "model": ..., "out": ..., "extra": [...]}'

The runner captions the partition while every batch it hands to ``generate`` is recorded; then the same
prepared batches are generated back to back with nothing else running in this process. Prints one JSON
line: the runner's stats, the batch sizes, the captions, and the model-alone seconds and tokens.
"""

from __future__ import annotations

import json
import sys
import time


def measure(meta: str, model: str, out: str, extra: list[str]) -> dict:
    from captioning_core import runtime

    runtime.setup_device("CPU")
    import pandas as pd

    from captioning_core.cli import build_parser, config_from_args
    from captioning_core.models.qwen2_vl import Qwen2VLCaptioner
    from captioning_core.runner import RankRunner
    from captioning_core.sharding import RankInfo

    class Recording(Qwen2VLCaptioner):
        batches: list = []

        def generate(self, batch):
            Recording.batches.append(list(batch))
            return super().generate(batch)

    args = build_parser("qwen2vl").parse_args([meta, "--pretrained_model_name_or_path", model, "--output", out,
                                               *extra])
    cfg = config_from_args("qwen2vl", args)
    cap = Recording(cfg)
    stats = RankRunner(cfg, RankInfo(0, 1), cap).run()
    texts = pd.read_csv(out, dtype=str, keep_default_na=False)["text"].tolist()
    # the model alone: the same prepared batches, back to back, nothing else running in this process
    t = time.perf_counter()
    alone_tokens = 0
    for batch in list(Recording.batches):
        alone_tokens += sum(len(ids) for ids in Qwen2VLCaptioner.generate(cap, batch))
    alone = time.perf_counter() - t
    return {"rows": stats.rows_processed, "wall": stats.wall_seconds, "calls": stats.generate_calls,
            "sizes": [len(b) for b in Recording.batches], "tokens": stats.output_tokens,
            "prefill": stats.prefill_tokens, "padding": stats.padding_tokens, "busy": stats.busy_seconds,
            "wait": stats.input_wait_seconds, "load": stats.load_seconds, "alone_wall": alone,
            "alone_tokens": alone_tokens, "texts": texts}


if __name__ == "__main__":
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
