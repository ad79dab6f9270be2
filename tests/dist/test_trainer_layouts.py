"""Every layout trains to the single-rank losses (fp32, within 1e-5 relative)."""

from __future__ import annotations

import functools

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]

STEPS = 3


def _train(rank: int, world_size: int, layout: str, options: dict) -> tuple[list[float], int]:
    from elastickit.trainer import TrainConfig, run_training

    result = run_training(TrainConfig(steps=STEPS, layout=layout, **options))
    return result.losses, result.local_numel


@functools.cache
def _reference(model: str) -> tuple[list[float], int]:
    from elastickit.trainer import TrainConfig, run_training

    result = run_training(TrainConfig(steps=STEPS, model=model))
    return result.losses, result.local_numel


@pytest.mark.parametrize(
    ("layout", "options"),
    [
        ("dp=2", {}),
        ("dp=2", {"dp_mode": "replicate"}),
        ("tp=2", {}),
        ("pp=2", {}),
        ("pp=2", {"pp_schedule": "1f1b", "model": "tiny-moe"}),
        ("dp=2,tp=2", {}),
        ("pp=2,tp=2", {}),
    ],
    ids=["dp2-fsdp", "dp2-replicate", "tp2", "pp2-gpipe", "pp2-1f1b-moe", "dp2tp2", "pp2tp2"],
)
def test_layout_matches_single_rank(layout: str, options: dict) -> None:
    from elastickit.trainer import TrainLayout

    ref_losses, full_numel = _reference(options.get("model", "tiny"))
    world = TrainLayout.parse(layout).world_size
    results = run_ranks(_train, world, args=(layout, options), timeout_s=120)
    for losses, _ in results:
        assert len(losses) == STEPS
        for got, want in zip(losses, ref_losses, strict=True):
            assert abs(got - want) <= 1e-5 * abs(want), (layout, losses, ref_losses)
    assert ref_losses[-1] < ref_losses[0]  # the steps did change the model
    # Each rank holds only its shards (replicate keeps full copies).
    numels = [n for _, n in results]
    if options.get("dp_mode") == "replicate":
        assert numels == [full_numel] * world
    else:
        assert max(numels) < full_numel
        assert sum(numels) >= full_numel  # every element is held somewhere
