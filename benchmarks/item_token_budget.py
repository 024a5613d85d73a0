"""Item 9: batching by token budget (the default) vs the seed's loop at bs 1 on clips of 2-20 s; the
padding share of prefill; the runner's tokens/s vs the model alone (``benchmarks.child_token_budget``)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.children import run_child
from benchmarks.common import TINY_ARGS, report
from testkit.paths import TINY_QWEN2VL


def bench_token_budget(work: Path) -> None:
    """Issue 14: the default (batches by token budget) on a partition of 2-20 s clips vs the seed-style loop
    at bs 1; padding share; and the runner's output tokens/s vs the model alone on the same batches."""
    from testkit.clips import ensure_clip
    from testkit.demo_clips import MIXED_DURATION_SPECS

    clips = [ensure_clip(spec, work / "clips") for spec in MIXED_DURATION_SPECS]
    meta = work / "meta.csv"
    meta.write_text("path\n" + "\n".join(str(c) for c in clips) + "\n")
    common = dict(meta=str(meta), model=str(TINY_QWEN2VL), extra=TINY_ARGS)
    seed = run_child("child_throughput", dict(mode="seed", bs="1", out=str(work / "seed.csv"), **common))
    ours = run_child("child_token_budget", dict(out=str(work / "ours.csv"), **common))
    seed_rate, our_rate = seed["rows"] / seed["wall"], ours["rows"] / ours["wall"]
    same = sum(a == b for a, b in zip(ours["texts"], seed["texts"], strict=True))
    report("9 token-budget default vs seed loop at bs 1, 64 clips of 2-20 s (tiny profile)",
           f"{our_rate / seed_rate:.2f}x ({our_rate:.2f} vs {seed_rate:.2f} rows/s; {ours['calls']} generate calls "
           f"of {ours['sizes']} videos vs {seed['calls']}; captions equal to the seed loop's on {same} of "
           f"{len(clips)} rows)", ">= 5x", our_rate / seed_rate >= 5 and same == len(clips))
    share = ours["padding"] / ours["prefill"]
    report("9 padding share of prefill tokens (default)", f"{100 * share:.1f}% ({ours['padding']} of "
           f"{ours['prefill']} tokens)", "<= 10%", share <= 0.10)
    runner_tps, alone_tps = ours["tokens"] / ours["wall"], ours["alone_tokens"] / ours["alone_wall"]
    report("9 runner output tokens/s vs the model alone on the same batches back to back",
           f"{runner_tps / alone_tps:.2f}x ({runner_tps:.1f} vs {alone_tps:.1f} tokens/s; "
           f"{ours['tokens'] / ours['rows']:.1f} tokens per row; runner wall {ours['wall']:.1f}s of which "
           f"{ours['busy']:.1f}s in generate, {ours['wait']:.1f}s waiting for decoded videos after a "
           f"{ours['load']:.1f}s model load; alone {ours['alone_wall']:.1f}s)", ">= 0.9x", runner_tps / alone_tps >= 0.9)
