"""Rows -> ranks: deterministic, disjoint and covering.

A row's rank depends only on its position and the world size, never on what is already done, so ranks
that read the journal at slightly different moments still agree on who owns what.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not (0 <= self.rank < self.world_size):
            raise ValueError(f"bad rank {self.rank} of world size {self.world_size}")


def rank_from_env(env: dict[str, str] | None = None) -> RankInfo:
    """Rank and world size as msrun exports them (RANK_ID/RANK_SIZE); 0 of 1 outside msrun."""
    env = os.environ if env is None else env
    rank = int(env.get("RANK_ID", "0"))
    world = int(env.get("RANK_SIZE") or env.get("MS_WORKER_NUM") or "1")
    return RankInfo(rank, world)


def rows_for_rank(n_rows: int, info: RankInfo) -> list[int]:
    """Row positions owned by ``info.rank``: every ``world_size``-th row, starting at the rank."""
    return list(range(info.rank, n_rows, info.world_size))
