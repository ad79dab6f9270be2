"""The shared spawn helper (tests/_dist.py): results come back per rank, errors name the rank."""

from __future__ import annotations

import pytest

from tests._dist import RankError, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


def _sum_ranks(rank: int, world_size: int, fail_rank: int) -> float:
    import torch
    import torch.distributed as dist

    if rank == fail_rank:
        raise ValueError(f"boom on {rank}")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t.item())


def test_results_per_rank_and_errors_name_the_rank() -> None:
    assert run_ranks(_sum_ranks, 2, args=(-1,), timeout_s=60) == [3.0, 3.0]
    with pytest.raises(RankError, match=r"rank 1 raised:(.|\n)*boom on 1"):
        run_ranks(_sum_ranks, 2, args=(1,), timeout_s=60, error_grace_s=1.0)
