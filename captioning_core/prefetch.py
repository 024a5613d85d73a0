"""Videos prepared ahead of the model, bounded by the bytes of prepared tensors, not by a video count.

A video count is no bound on memory: one 4K 10-minute clip at the frame cap is ~0.6 GB of float32 while a
short clip is a few MB. A new video starts preparing only while the prepared-but-not-yet-generated items
plus those in flight (each estimated at the largest size seen so far) fit in ``budget`` bytes; until the
first item's size is known, only one is in flight. One item larger than the whole budget is still
prepared, alone, and a batch being assembled may pull items past the budget: the bound is
max(budget, one batch). The peak of prepared bytes held is recorded so a run can show the bound held.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np


def nbytes(obj: object, _depth: int = 0) -> int:
    """Bytes of the numpy arrays an item holds (through dataclass fields, dicts, lists and tuples)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if _depth > 4 or obj is None or isinstance(obj, str | bytes | int | float):
        return len(obj) if isinstance(obj, bytes) else 0
    if isinstance(obj, dict):
        return sum(nbytes(v, _depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(nbytes(v, _depth + 1) for v in obj)
    fields = getattr(obj, "__dict__", None)
    return sum(nbytes(v, _depth + 1) for v in fields.values()) if fields else 0


#: ``BytePrefetcher.get``: the next item is not prepared yet, or (``past_budget=False``) does not fit the budget
NOT_READY = ("not ready", -1)


class BytePrefetcher:
    """Runs ``prepare(row)`` on a thread pool ahead of the consumer; yields results in row order.

    The consumer calls ``release(size)`` once it is done with an item (after its batch generated)."""

    def __init__(self, rows: list[int], prepare: Callable[[int], object], size_of: Callable[[object], int],
                 budget: int, max_items: int, workers: int) -> None:
        self._rows = iter(rows)
        self._prepare = prepare
        self._size_of = size_of
        self.budget = budget
        self.max_items = max_items
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        self._lock = threading.Lock()
        self._futures: deque[Future] = deque()
        self._in_flight = 0
        self._waiting = 0  # prepared, not yet taken by the consumer
        self.held = 0  # bytes prepared and not yet released
        self.peak = 0
        self._largest = 0
        self._exhausted = False
        self._closed = False
        with self._lock:
            self._pump()

    def _admit(self) -> bool:
        if self._exhausted or self._closed or self._in_flight + self._waiting >= self.max_items:
            return False
        if self.held == 0 and self._in_flight == 0:
            return True  # always make progress, even with one item over the budget
        if self._largest == 0:
            return False  # size unknown yet: one at a time
        return self.held + (self._in_flight + 1) * self._largest <= self.budget

    def _pump(self, force: bool = False) -> None:
        """Start what the budget admits; ``force``: the consumer waits with nothing in flight (a batch
        being assembled holds the budget), so start one regardless."""
        while self._admit() or (force and not self._futures and not self._exhausted and not self._closed):
            row = next(self._rows, None)
            if row is None:
                self._exhausted = True
                return
            self._in_flight += 1
            future = self._pool.submit(self._run, row)
            self._futures.append(future)

    def _run(self, row: int) -> tuple[object, int]:
        try:
            item = self._prepare(row)
            size = self._size_of(item)
        except BaseException:
            with self._lock:
                self._in_flight -= 1
                self._pump()
            raise
        with self._lock:
            self._in_flight -= 1
            self._waiting += 1
            self.held += size
            self._largest = max(self._largest, size)
            self.peak = max(self.peak, self.held)
            self._pump()
        return item, size

    def __iter__(self) -> Iterator[tuple[object, int]]:
        """Every item in row order, waiting as needed; the consumer may hold several before releasing."""
        while (got := self.get(past_budget=True)) is not None:
            yield got

    def get(self, block: bool = True, past_budget: bool = False) -> tuple[object, int] | None:
        """The next prepared item in row order, or None when every row has been handed out.

        ``block=False``: NOT_READY when the next item is still being prepared (or not started).
        ``block=True``: waits for it. When nothing is in flight because the consumer's unreleased items fill
        the byte budget, one more is started past the budget only if ``past_budget`` or the consumer holds
        nothing; otherwise NOT_READY says "use what you hold" (the runner's pool then batches what it has)."""
        with self._lock:
            if not self._futures:
                if not block:
                    self._pump()
                    return None if self._exhausted and not self._futures else NOT_READY
                self._pump(force=past_budget or self.held == 0)
            if not self._futures:
                return None if self._exhausted else NOT_READY
            if not block and not self._futures[0].done():
                return NOT_READY
            future = self._futures.popleft()
        item, size = future.result()
        with self._lock:
            self._waiting -= 1
        return item, size

    def release(self, size: int) -> None:
        with self._lock:
            self.held -= size
            self._pump()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
