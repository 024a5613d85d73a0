"""Batches by token budget: which pooled videos go together, and the runner's loop around it.

``take_batch`` is pure and checked on its own; the runner is checked on real clips of different durations
with a captioner that names each clip's colour (testkit/colour_captioner.py, as in tests/test_runner.py) and reports a token count
that grows with the clip's frames, so batching decisions, journaling, resume and the out-of-memory
retry are all real. The tiny Qwen2-VL's captions under the default equal those at ``--bs 1`` in
tests/test_batching.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from captioning_core import journal
from captioning_core.batching import take_batch
from captioning_core.config import RunConfig
from captioning_core.faults import FaultPlan
from captioning_core.prefetch import NOT_READY, BytePrefetcher
from captioning_core.runner import RankRunner
from captioning_core.sharding import RankInfo
from captioning_core.stats import MIN_RATE_SECONDS
from testkit.clips import ClipSpec, ensure_clip
from testkit.colour_captioner import ColourCaptioner, colour_config
from testkit.partition import Row, meta_csv

TEXT_TOKENS = 10
TOKENS_PER_FRAME = 8


# -- take_batch ---------------------------------------------------------------------------------------------
def test_take_batch_groups_the_longest_similar_lengths_within_budget_and_padding():
    lengths = [100, 400, 390, 105, 380, 98, 200]
    assert take_batch(lengths, 10_000, None) == [1, 2, 4]  # 400, 390, 380: 2.5% padding; 200 would pad 30%
    assert take_batch(lengths, 800, None) == [1, 2]  # 3 x 400 > 800
    assert take_batch(lengths, 10_000, 2) == [1, 2]  # --bs caps the count
    assert take_batch([100, 98, 105], 10_000, None) == [2, 0, 1]
    assert take_batch([5000, 10], 1000, None) == [0]  # over the budget: alone, never skipped
    assert take_batch([7, 7, 7], 10_000, None, max_padding=0.0) == [0, 1, 2]  # equal lengths pad nothing
    assert take_batch([], 100, None) == []


def test_take_batch_without_token_counts_batches_by_count_in_pool_order():
    assert take_batch([None, None, None], 10, None) == [0]  # no --bs: one video per call, as the seed
    assert take_batch([None, 5, None], 10, 2) == [0, 1]
    assert take_batch([5, 9, 7], 100, 1) == [0]  # --bs 1: the seed's loop, in row order


def test_take_batch_padding_never_exceeds_the_limit():
    import random

    rng = random.Random(7)
    for _ in range(200):
        pool = [rng.randint(1, 500) for _ in range(rng.randint(1, 40))]
        cap = rng.choice([None, 1, 3, 8])
        picked = take_batch(pool, rng.randint(1, 5000), cap, 0.1)
        if cap == 1:
            assert picked == [0]
            continue
        chosen = [pool[i] for i in picked]
        padded = len(chosen) * max(chosen)
        assert max(chosen) == max(pool)
        assert len(chosen) == 1 or (padded <= 5000 and padded - sum(chosen) <= 0.1 * padded)


# -- BytePrefetcher.get(block=False) ------------------------------------------------------------------------
def test_prefetcher_get_without_blocking_reports_not_ready_then_the_item():
    gate = threading.Event()

    def prepare(row: int) -> int:
        if row == 1:
            gate.wait(10)
        return row

    fetcher = BytePrefetcher([0, 1], prepare, lambda item: 1, budget=100, max_items=4, workers=2)
    try:
        assert fetcher.get() == (0, 1)
        assert fetcher.get(block=False) is NOT_READY
        gate.set()
        deadline = time.monotonic() + 10
        while (got := fetcher.get(block=False)) is NOT_READY and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == (1, 1)
        assert fetcher.get(block=False) is None and fetcher.get() is None
    finally:
        fetcher.close()


def test_prefetcher_blocking_get_keeps_the_budget_while_the_consumer_holds_items():
    """A pool being assembled gets NOT_READY, not an item past the budget; once it releases, or when it
    asks with ``past_budget`` (as iteration does), the next item comes."""
    fetcher = BytePrefetcher([0, 1, 2], lambda row: row, lambda item: 60, budget=100, max_items=4, workers=2)
    try:
        assert fetcher.get() == (0, 60)
        assert fetcher.get() is NOT_READY and fetcher.held == 60  # 60 + 60 > 100: row 1 not started
        assert fetcher.get(past_budget=True) == (1, 60) and fetcher.held == 120
        fetcher.release(60)
        fetcher.release(60)
        assert fetcher.get() == (2, 60)
        fetcher.release(60)
        assert fetcher.get() is None
    finally:
        fetcher.close()


# -- the runner ---------------------------------------------------------------------------------------------
class TokenColourCaptioner(ColourCaptioner):
    """ColourCaptioner that reports a prompt length growing with the clip's sampled frames, and records
    the prompt lengths of every generate call."""

    calls: list[list[int]] = []

    def prefill_tokens(self, item) -> int:
        return TEXT_TOKENS + TOKENS_PER_FRAME * len(item.thumb_frames)

    def generate(self, batch: list) -> list[list[int]]:
        TokenColourCaptioner.calls.append([self.prefill_tokens(item) for item in batch])
        return super().generate(batch)


COLOURS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> list[tuple[Path, ClipSpec]]:
    """16 clips of 1 to 8 s (2 to 16 frames at the runner tests' 2 fps), durations interleaved."""
    directory = tmp_path_factory.mktemp("mixed")
    specs = [ClipSpec(COLOURS[i % 4], "left", "square", 160, 120, 10, 1.0 + (i * 5) % 8, 10) for i in range(16)]
    return [(ensure_clip(spec, directory), spec) for spec in specs]


def _partition(tmp_path: Path, clips) -> str:
    meta = tmp_path / "meta.csv"
    meta.write_bytes(meta_csv([Row(str(path), spec) for path, spec in clips]))
    return str(meta)


def _run(cfg: RunConfig, faults: FaultPlan | None = None):
    TokenColourCaptioner.calls = []
    return RankRunner(cfg, RankInfo(0, 1), TokenColourCaptioner(cfg), faults or FaultPlan()).run()


def _texts(cfg: RunConfig) -> list[tuple[str, str]]:
    out = pd.read_csv(cfg.output, dtype=str, keep_default_na=False)
    return list(zip(out["caption_status"], out["text"], strict=True))


@pytest.fixture(scope="module")
def tokens(mixed) -> list[int]:
    """Each clip's prompt length as the captioner reports it (row order)."""
    cap = TokenColourCaptioner(colour_config("unused.csv"))
    return [cap.prefill_tokens(cap.prepare(str(path))) for path, _ in mixed]


def test_default_batches_similar_lengths_and_every_row_gets_its_own_caption(tmp_path, mixed, tokens):
    cfg = colour_config(_partition(tmp_path, mixed))
    assert cfg.bs is None and len(set(tokens)) >= 6
    stats = _run(cfg)
    assert _texts(cfg) == [("ok", spec.color) for _, spec in mixed]
    calls = TokenColourCaptioner.calls
    assert sorted(n for call in calls for n in call) == sorted(tokens)
    assert len(calls) <= len(mixed) / 2  # batched, not one video per call
    for call in calls:  # each batch within 10% padding of its longest
        assert len(call) * max(call) - sum(call) <= 0.1 * len(call) * max(call), calls
    assert stats.generate_calls == len(calls) and stats.output_tokens == len(mixed)  # one token per caption
    assert stats.prefill_tokens == sum(len(c) * max(c) for c in calls)
    assert stats.padding_tokens == sum(len(c) * max(c) - sum(c) for c in calls)
    assert stats.to_dict()["padding_share"] <= 0.1 and stats.to_dict()["output_tokens_per_second"] > 0
    summary = json.loads(Path(cfg.layout.summary).read_text())
    assert summary["output_tokens_per_row"] == 1.0  # the colour captioner's captions are one token each
    # the summary rounds the rank record's figure (3 places) to 2: compare the same chain, not the raw float
    # (and leaves a rate out if the rank ran under MIN_RATE_SECONDS: the colour captioner is that fast on a quiet host)
    rate = round(stats.to_dict()["output_tokens_per_second"], 2)
    timed = stats.wall_seconds >= MIN_RATE_SECONDS
    assert summary["output_tokens_per_second_per_rank"] == [rate if timed else None]
    index = Path(f"{cfg.output}.gallery/index.html").read_text()
    assert "output tokens/row" in index and f"<b>{rate if timed else '-'}</b>" in index


def test_token_budget_and_bs_bound_every_batch(tmp_path, mixed, tokens):
    budget = 3 * max(tokens)
    cfg = colour_config(_partition(tmp_path, mixed), batch_tokens=budget, bs=2)
    _run(cfg)
    assert _texts(cfg) == [("ok", spec.color) for _, spec in mixed]
    calls = TokenColourCaptioner.calls
    assert all(len(c) <= 2 and len(c) * max(c) <= budget for c in calls), calls
    assert max(len(c) for c in calls) == 2


def test_a_video_over_the_budget_goes_alone(tmp_path, mixed, tokens):
    budget = 3 * min(tokens)  # the shortest clips batch; the longest are over it
    cfg = colour_config(_partition(tmp_path, mixed), batch_tokens=budget)
    _run(cfg)
    calls = TokenColourCaptioner.calls
    assert sorted(c[0] for c in calls if max(c) > budget) == sorted(n for n in tokens if n > budget) != []
    assert all(len(c) == 1 for c in calls if max(c) > budget)
    assert all(len(c) * max(c) <= budget for c in calls if len(c) > 1) and any(len(c) > 1 for c in calls)
    assert _texts(cfg) == [("ok", spec.color) for _, spec in mixed]


def test_bs_1_is_one_video_per_call_in_row_order(tmp_path, mixed, tokens):
    cfg = colour_config(_partition(tmp_path, mixed), bs=1)
    _run(cfg)
    assert TokenColourCaptioner.calls == [[n] for n in tokens]


class RecordingFaults(FaultPlan):
    """The injected out-of-memory fault, noting the rows of every batch it sees (it fires before generate)."""

    def before_generate(self, rows: list[int]) -> None:
        self.tried.append(list(rows))
        super().before_generate(rows)


def test_out_of_memory_batch_retries_row_by_row_lowers_the_budget_and_only_that_row_is_left(
        tmp_path, mixed, tokens):
    big, small = tokens.index(max(tokens)), tokens.index(min(tokens))
    clips = [mixed[big], mixed[big]] + [mixed[small]] * 8  # 8 short rows fit one batch, unless lowered
    cfg = colour_config(_partition(tmp_path, clips))
    faults = RecordingFaults(oom_rows={0})
    faults.tried = []
    stats = _run(cfg, faults)
    assert faults.tried[:3] == [[0, 1], [0], [1]]  # the batch failed, then each of its rows ran alone
    lowered = 2 * max(tokens) // 2
    assert sorted(r for b in faults.tried[3:] for r in b) == list(range(2, 10))
    assert all(len(b) * min(tokens) <= lowered for b in faults.tried[3:]), faults.tried
    assert (stats.transient, stats.captioned) == (1, 9) and stats.needs_retry
    results = journal.load(cfg.layout.parts, [str(p) for p, _ in clips])
    assert [r for r, res in results.items() if res.status != "ok"] == [0]
    again = _run(cfg)  # the next attempt redoes exactly that row, and publishes
    assert again.rows_processed == 1 and TokenColourCaptioner.calls == [[max(tokens)]]
    assert _texts(cfg) == [("ok", spec.color) for _, spec in clips]


# -- Qwen2-VL's prefill_tokens is the prompt the model gets -------------------------------------------------
PREFILL_CHECK = """
import json, sys
from captioning_core import runtime
runtime.setup_device("CPU")
from captioning_core.config import RunConfig
from captioning_core.models.qwen2_vl import Qwen2VLCaptioner
from testkit.profile import TINY
cfg = RunConfig(meta_path="m.csv", model="qwen2vl", pretrained_model_name_or_path=sys.argv[1], device_target="CPU",
                model_options=TINY.model_options())
cap = Qwen2VLCaptioner(cfg)
cap.setup()
items = [cap.prepare(path) for path in sys.argv[2:]]
alone = [int(cap.model_inputs([item])["attention_mask"].sum()) for item in items]
batch = cap.model_inputs(items)
print(json.dumps({"reported": [cap.prefill_tokens(item) for item in items], "alone": alone,
                  "in_batch": batch["attention_mask"].sum(axis=1).tolist(), "width": batch["input_ids"].shape[1]}))
"""


@pytest.mark.integration
def test_qwen2vl_prefill_tokens_is_the_prompt_length_generate_gets(mixed):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    clips = [str(mixed[i][0]) for i in (0, 1, 2)]  # 1, 6 and 3 s
    proc = subprocess.run([sys.executable, "-c", PREFILL_CHECK, str(repo / "tiny_models" / "qwen2vl"), *clips],
                          capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(got["reported"])) == 3
    assert got["reported"] == got["alone"] == got["in_batch"] and got["width"] == max(got["reported"])
