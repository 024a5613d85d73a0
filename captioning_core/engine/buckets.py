"""Shape buckets: the few padded sizes each graph is compiled for.

A compiled graph is specialised to its input shapes, so every new batch size, prompt length or patch count
would compile again (about a second per graph on CPU). Inputs are padded up to the next bucket instead: a
geometric series (ratio 1.25, rounded to a multiple) keeps the padding under a quarter while the number of
graphs grows only with the log of the range.
"""

from __future__ import annotations

from dataclasses import dataclass


def geometric(n: int, minimum: int, multiple: int, ratio: float = 1.25) -> int:
    """The smallest bucket >= n of the series ``minimum, ceil(prev*ratio) rounded up to multiple, ...``."""
    if n < 1:
        raise ValueError(f"bucket of {n}: must be >= 1")
    b = minimum
    while b < n:
        b = max(b + multiple, -(-int(b * ratio + 0.999999) // multiple) * multiple)
    return b


def power_of_two(n: int) -> int:
    if n < 1:
        raise ValueError(f"bucket of {n}: must be >= 1")
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class Buckets:
    """Bucket choices. ``lengths`` (explicit prompt-length buckets, ascending) overrides the series; prompts
    longer than its last entry use the series."""
    length_min: int = 32
    length_multiple: int = 16
    patch_min: int = 64        # patches per temporal group (a multiple of the 2x2 merge)
    patch_multiple: int = 16
    lengths: tuple[int, ...] = ()

    def length(self, n: int) -> int:
        for b in self.lengths:
            if b >= n:
                return b
        return geometric(n, self.length_min, self.length_multiple)

    def batch(self, n: int) -> int:
        return power_of_two(n)

    def groups(self, n: int) -> int:
        return power_of_two(n)

    def patches(self, n: int) -> int:
        return geometric(n, self.patch_min, self.patch_multiple)
