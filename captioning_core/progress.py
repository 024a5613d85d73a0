"""Per-rank progress lines: rows done out of the total, rate, ETA and model-busy fraction."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("captioning_core.progress")


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    def __init__(self, info, total: int, every: float) -> None:
        self.info = info
        self.total = total
        self.every = every
        self._last = 0.0

    def line(self, stats) -> str:
        done = stats.rows_processed
        rate = stats.rows_per_second
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / self.total if self.total else 100.0
        return (f"progress rank {self.info.rank}/{self.info.world_size}: {done}/{self.total} rows "
                f"({pct:.0f}%), {rate:.2f} rows/s, ETA {_eta(eta)}, failed {stats.failed}, "
                f"model busy {100 * stats.busy_fraction:.0f}%")

    def update(self, stats) -> None:
        now = time.monotonic()
        if now - self._last >= self.every or stats.rows_processed == self.total:
            self._last = now
            log.info("%s", self.line(stats))

    def done(self, stats) -> None:
        log.info("rank %d/%d finished: %d captioned, %d failed, %.1f s, %.2f rows/s, model busy %.0f%%, "
                 "decode %.3f s/row, waited %.1f s for decoded videos; %d generate calls, %d output tokens "
                 "(%.1f per row, %.1f tokens/s), padding %.1f%% of %d prefill tokens", self.info.rank,
                 self.info.world_size, stats.captioned, stats.failed, stats.wall_seconds, stats.rows_per_second,
                 100 * stats.busy_fraction, stats.decode_seconds / stats.rows_processed if stats.rows_processed else 0.0,
                 stats.input_wait_seconds, stats.generate_calls, stats.output_tokens,
                 stats.output_tokens / stats.captioned if stats.captioned else 0.0, stats.output_tokens_per_second,
                 100 * stats.padding_tokens / stats.prefill_tokens if stats.prefill_tokens else 0.0,
                 stats.prefill_tokens)
