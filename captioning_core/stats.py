"""One stats record per rank and attempt, and the one merge of such records.

A rank writes its :class:`RankStats` beside the journal (``PartitionLayout.stats``); the summary (publish), the
operator's XCom result and the gallery read merged figures from :func:`merge`. Figures over *ranks of one
attempt* (the latest attempt in the summary, this try in the XCom) are named ``attempt_*``; figures over the
partition's final rows are named ``partition_*``. Standard library only: the operator imports it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)


@dataclass
class RankStats:
    rank: int
    world_size: int
    rows_owned: int = 0
    rows_skipped: int = 0
    rows_processed: int = 0
    captioned: int = 0
    failed: int = 0
    transient: int = 0  # rows left for the next attempt after an environment error
    generate_calls: int = 0
    output_tokens: int = 0  # new tokens of the captions this attempt generated
    prefill_tokens: int = 0  # prompt tokens fed to generate, padding included (batches of known token counts)
    padding_tokens: int = 0  # of which padding: shorter prompts left-padded to the batch's longest
    load_seconds: float = 0.0
    busy_seconds: float = 0.0
    wall_seconds: float = 0.0
    decode_seconds: float = 0.0
    input_wait_seconds: float = 0.0  # the model loop waiting for decoded videos: >0 means decode-bound
    prefetch_peak_bytes: int = 0  # most bytes of prepared tensors held at once (bounded by prefetch_bytes)
    model_loaded: bool = False
    stopped_early: str = ""  # why the rank stopped before its last row ("" if it did not)
    last_transient_error: str = ""
    fingerprint: str = ""
    started_at: float = field(default_factory=time.time)

    @property
    def busy_fraction(self) -> float:
        return self.busy_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows_processed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def needs_retry(self) -> bool:
        """This attempt left work for the next one: the process should exit non-zero."""
        return bool(self.transient or self.stopped_early)

    def account(self) -> str:
        """One line for the exit: which rows are left and why."""
        return (f"rank {self.rank}/{self.world_size}: {self.transient} of {self.rows_owned - self.rows_skipped} rows "
                f"left for the next attempt after transient errors"
                f"{'; stopped early: ' + self.stopped_early if self.stopped_early else ''}; last error: "
                f"{self.last_transient_error}; partition not published")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(busy_fraction=round(self.busy_fraction, 4), rows_per_second=round(self.rows_per_second, 4),
                   output_tokens_per_second=round(self.output_tokens_per_second, 3),
                   padding_share=round(self.padding_tokens / self.prefill_tokens, 4) if self.prefill_tokens else None,
                   decode_seconds_per_row=round(self.decode_seconds / self.rows_processed, 4)
                   if self.rows_processed else 0.0)
        return out


def newest_per_rank(ranks: list[dict]) -> list[dict]:
    """The most recent record of each rank (the latest attempt)."""
    newest: dict[int, dict] = {}
    for stat in ranks:
        if stat["rank"] not in newest or stat.get("started_at", 0) > newest[stat["rank"]].get("started_at", 0):
            newest[stat["rank"]] = stat
    return list(newest.values())


def load_records(uris: Iterable[str], read: Callable[[str], bytes | str]) -> list[dict]:
    """The stats records at ``uris``, each read with ``read``. Stats are figures only: an unreadable record is
    logged and left out, never a reason to block a publish or fail a finished partition."""
    out = []
    for uri in uris:
        try:
            out.append(json.loads(read(uri)))
        except Exception as err:
            log.warning("unreadable stats object %s: %s: %s", uri, type(err).__name__, err)
    return out


def since(ranks: list[dict], started: float) -> list[dict]:
    """Records of ranks started at or after ``started`` (one try of the operator)."""
    return [s for s in ranks if s.get("started_at", 0) >= started]


#: a rank's rate over less wall time than this is noise, not a figure (a rank whose only pending row was a
#: broken file is done in a millisecond: thousands of rows/s); summaries, XCom and the gallery leave it out
MIN_RATE_SECONDS = 0.5


def _timed_long_enough(stat: dict) -> bool:
    return stat.get("wall_seconds", 0.0) >= MIN_RATE_SECONDS


def tokens_per_second_per_rank(ranks: list[dict]) -> list[float | None]:
    """Output tokens per second of each rank (by rank), from rank stats dicts; None for a rank that ran less
    than ``MIN_RATE_SECONDS``."""
    return [round(s.get("output_tokens_per_second", 0.0), 2) if _timed_long_enough(s) else None
            for s in sorted(ranks, key=lambda s: s["rank"])]


def merge(ranks: list[dict], digits: int = 3) -> dict:
    """Figures of one attempt's rank records: sums, and rates over the summed seconds (``digits`` rounding of
    rows/s and model-busy). rows/s is the sum of the ranks' rates, over ranks that ran at least
    ``MIN_RATE_SECONDS`` (None if none did)."""
    wall = sum(s.get("wall_seconds", 0.0) for s in ranks)
    timed = [s for s in ranks if _timed_long_enough(s)]
    decoded = sum(s.get("rows_processed", 0) for s in ranks)
    generated = sum(s.get("captioned", 0) for s in ranks)
    tokens = sum(s.get("output_tokens", 0) for s in ranks)
    return {"skipped": sum(s.get("rows_skipped", 0) for s in ranks),
            "rows_per_second": round(sum(s.get("rows_per_second", 0.0) for s in timed), digits) if timed else None,
            "model_busy": round(sum(s.get("busy_seconds", 0.0) for s in ranks) / wall, digits) if wall else None,
            "decode_seconds_per_row": round(sum(s.get("decode_seconds", 0.0) for s in ranks) / decoded, 4)
            if decoded else None,
            "input_wait_seconds": round(sum(s.get("input_wait_seconds", 0.0) for s in ranks), 3),
            "attempt_output_tokens_per_row": round(tokens / generated, 2) if generated else None,
            "output_tokens_per_second_per_rank": tokens_per_second_per_rank(ranks)}


def partition_tokens_per_row(tokens: list[int]) -> float | None:
    """Mean output tokens of the partition's captioned rows (``tokens``: one per ok row)."""
    return round(sum(tokens) / len(tokens), 2) if tokens else None
