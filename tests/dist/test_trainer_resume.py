"""Save at step k, restore in a fresh process group at the same layout: step k+1 is
bit-identical. Restored at another (dp, tp) layout, the run continues on the single-rank curve."""

from __future__ import annotations

import shutil

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(200)]

STEPS, K = 4, 2


def _config(layout: str, ckpt: str | None, stop_after: int | None):
    from elastickit.trainer import TrainConfig

    return TrainConfig(
        steps=STEPS, layout=layout, ckpt_dir=ckpt, ckpt_every=K, stop_after=stop_after
    )


def _uninterrupted_then_interrupted(rank: int, world_size: int, layout: str, ckpt: str):
    from elastickit.trainer import run_training

    full = run_training(_config(layout, None, None))
    first = run_training(_config(layout, ckpt, K))
    return full.losses, first.losses, first.end_step


def _resumed(rank: int, world_size: int, layout: str, ckpt: str):
    from elastickit.trainer import run_training

    result = run_training(_config(layout, ckpt, None))
    return result.start_step, result.losses


def _check(layout: str, world: int, ckpt: str, copies: tuple[str, ...] = ()) -> list[float]:
    before = run_ranks(_uninterrupted_then_interrupted, world, args=(layout, ckpt), timeout_s=150)
    for copy in copies:
        shutil.copytree(ckpt, copy)
    after = run_ranks(_resumed, world, args=(layout, ckpt), timeout_s=150)  # a fresh group
    for (full, first, end), (start, rest) in zip(before, after, strict=True):
        assert first == full[:K] and end == K
        assert start == K
        assert rest == full[K:]  # bit-identical (==, not approx), step K+1 included
    return before[0][0]


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want))


def test_resume_dp2_tp2_is_bit_exact_and_reshards_to_other_layouts(tmp_path) -> None:
    ckpt, single, tp2 = (str(tmp_path / n) for n in ("ckpt", "single", "tp2"))
    full = _check("dp=2,tp=2", 4, ckpt, copies=(single, tp2))
    # Another layout reads the same checkpoint (fused QKV / gate-up and vocab padding resharded).
    from elastickit.trainer import run_training

    one = run_training(_config("single", single, None))
    assert one.start_step == K and _close(one.losses, full[K:]), (one.losses, full)
    for start, rest in run_ranks(_resumed, 2, args=("tp=2", tp2), timeout_s=150):
        assert start == K and _close(rest, full[K:]), (rest, full)


def test_resume_is_bit_exact_pp2(tmp_path) -> None:
    _check("pp=2", 2, str(tmp_path / "ckpt"))
