"""The store coordinator's account of who is missing when a round fails."""

from __future__ import annotations

import pytest
from elastickit.checkpoint.coord import StoreCoordinator
from elastickit.checkpoint.errors import RankFailure


class DeadAfterSet:
    """A store whose connection breaks once this rank has set its key (a generation's sockets
    shut by an abort): every later request fails, and each one is counted."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.failed = 0

    def set(self, key: str, value: str | bytes) -> None:
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys: list[str]) -> bool:
        self.failed += 1
        raise ConnectionError("Broken pipe")

    def get(self, key: str) -> bytes:
        raise ConnectionError("Broken pipe")


def test_a_dead_connection_is_asked_once_and_every_rank_not_known_counts_missing():
    store = DeadAfterSet()
    coord = StoreCoordinator(store, rank=2, world_size=8, prefix="ck", timeout_s=1.0)
    with pytest.raises(RankFailure, match=r"rank\(s\) \[0, 1, 3, 4, 5, 6, 7\] did not reach checkpoint phase 'plan'"):
        coord.all_gather({"x": 1}, phase="plan")
    assert store.failed == 2  # the wait's check, then one check of the account: not one per rank
