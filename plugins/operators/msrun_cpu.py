"""CpuSampler: what msrun's join loop costs in CPU, for benchmark item 10 and tests/test_msrun_join.py.

msrun (MindSpore 2.7) waits for its workers in a loop that polls without sleeping; the hook's idle join
(``MsrunSpec.idle_join``) exists because of it. Measuring that loop is a benchmark's business, not the
operator's, so the sampling lives here and is attached to one hook as its observer:
``MsrunHook(spec, observer=CpuSampler())``; a hook without one samples nothing.
"""

from __future__ import annotations

import contextlib
import time


class CpuSampler:
    """msrun's own CPU seconds, sampled each time the hook polls it, and where its join loop began."""

    def __init__(self) -> None:
        self.msrun_cpu_seconds = 0.0  # msrun's own CPU time (user + system), at the last sample
        self.join_cpu_start: tuple[float, float] | None = None  # (monotonic time, msrun CPU s) at the join
        self.join_ended = 0.0  # monotonic time of the last CPU sample
        self._msrun = None  # psutil.Process of msrun, made once

    def _cpu_seconds(self, pid: int) -> float:
        import psutil

        if self._msrun is None or self._msrun.pid != pid:
            self._msrun = psutil.Process(pid)
        return sum(self._msrun.cpu_times()[:2])

    def polled(self, pid: int) -> None:
        """Sample msrun's CPU seconds (called by the hook once a second while it waits for msrun)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            self.msrun_cpu_seconds = self._cpu_seconds(pid)
            self.join_ended = time.monotonic()

    def join_started(self, pid: int) -> None:
        """Note msrun's CPU seconds when its join loop starts (what follows is the loop's cost)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            self.join_cpu_start = (time.monotonic(), self._cpu_seconds(pid))

    @property
    def join_cores(self) -> float | None:
        """Cores msrun's join loop used on average (CPU seconds / wall seconds since it started)."""
        if self.join_cpu_start is None or self.join_ended <= self.join_cpu_start[0]:
            return None
        return (self.msrun_cpu_seconds - self.join_cpu_start[1]) / (self.join_ended - self.join_cpu_start[0])
