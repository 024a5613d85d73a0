"""Which prepared videos the rank generates together, and how that changes after an out-of-memory batch.

The pool of prepared videos is the runner's; this module only decides. ``take_batch`` is pure (checked on
its own in tests/test_token_batching.py); ``BatchPlanner`` holds the one piece of state a run changes: the
token budget (``--batch_tokens``) and the video cap (``--bs``), halved after a batch runs out of memory so
the rank does not pay a failed batch and a row-by-row retry again and again.
"""

from __future__ import annotations

#: most share of a batch's prefill tokens that may be padding (shorter prompts left-padded to the longest)
MAX_PADDING = 0.10


def take_batch(lengths: list[int | None], budget: int, cap: int | None,
               max_padding: float = MAX_PADDING) -> list[int]:
    """Which of the pooled videos (their prefill token counts) to generate together: indices into ``lengths``.

    Longest first, then the next longest while the batch's padded prefill (videos x the longest) stays within
    ``budget``, the count within ``cap`` and the padding within ``max_padding`` of the batch's tokens; so a
    batch holds similar lengths and a long video never pads a batch of short ones. The longest video always
    goes, alone if it is over the budget. With ``cap`` 1, or unknown lengths (None), videos go in pool (row)
    order, at most ``cap`` (one if no cap) at a time.
    """
    if not lengths:
        return []
    if cap == 1 or any(n is None for n in lengths):  # --bs 1 (the seed's loop) keeps row order
        return list(range(min(len(lengths), cap or 1)))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = lengths[order[0]]
    chosen, real = [order[0]], longest
    for i in order[1:]:
        k = len(chosen) + 1
        padded = k * longest
        if (cap and k > cap) or padded > budget or padded - real - lengths[i] > max_padding * padded:
            break
        chosen.append(i)
        real += lengths[i]
    return chosen


def padded_tokens(lengths: list[int]) -> int:
    """Prefill tokens a batch of these prompt lengths costs: every row left-padded to the longest."""
    return len(lengths) * max(lengths)


class BatchPlanner:
    """The budget and cap one run batches under; ``after_oom`` lowers them for the rest of the run."""

    def __init__(self, budget: int, cap: int | None) -> None:
        self.budget = budget
        self.cap = cap

    def pick(self, lengths: list[int | None]) -> list[int]:
        """Indices of the pooled videos to generate next (see ``take_batch``)."""
        return take_batch(lengths, self.budget, self.cap)

    def pool_full(self, lengths: list[int | None], batches: int) -> bool:
        """The pool holds ``batches`` batches' worth of videos (by tokens, or by ``--bs``)."""
        if not lengths:
            return False
        if any(n is None for n in lengths):
            return len(lengths) >= (self.cap or 1) * batches
        return (sum(lengths) >= self.budget * batches
                or (self.cap is not None and len(lengths) >= self.cap * batches))

    def after_oom(self, lengths: list[int | None]) -> str:
        """A batch of these lengths ran out of memory: later batches get at most half of it (tokens, or
        videos when token counts are unknown). Returns what the new limit is, for the log."""
        if all(n is not None for n in lengths):
            self.budget = min(self.budget, max(1, padded_tokens(lengths) // 2))
            return f"token budget {self.budget}"
        self.cap = max(1, min(self.cap or len(lengths), len(lengths) // 2))
        return f"at most {self.cap} videos per batch"
