"""Training-level resharding: save from the reference trainer at one layout, resume at another,
and the next step's loss equals the uninterrupted run's within 1e-5 relative.

One spawn of 4 gloo ranks runs every 4-rank case in sequence (saves at (dp=2,tp=2) and
(pp=2,tp=2), resumes at (dp=4), (tp=4), (pp=2,dp=2)); the single-rank resumes run in this process.
"""

from __future__ import annotations

import shutil

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(280)]

K = 2  # checkpoint at step K, compare step K + 1


def _model():
    from elastickit.trainer.model import ModelConfig

    # tiny, but with 8 query / 4 kv heads so that tp=4 splits GQA; V=250 pads to 256.
    return ModelConfig(
        vocab_size=250, dim=32, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=64, max_seq_len=64
    )


def _run(layout: str, ckpt: str | None):
    from elastickit.trainer import TrainConfig, run_training

    cfg = TrainConfig(
        model=_model(),
        layout=layout,
        steps=K + 1,
        ckpt_dir=ckpt,
        ckpt_every=K,
        global_batch=8,
        seq_len=16,
    )
    return run_training(cfg)


def _copy(rank: int, src: str, dst: str) -> None:
    import torch.distributed as dist

    if rank == 0:
        shutil.copytree(src, dst)
    dist.barrier()


def _four_ranks(rank: int, world_size: int, root: str):
    out = {}
    a = _run("dp=2,tp=2", f"{root}/a")  # saves step K; its step K+1 is the uninterrupted loss
    out["a"] = (a.start_step, a.losses)
    b = _run("pp=2,tp=2", f"{root}/b")
    out["b"] = (b.start_step, b.losses)
    for name, layout in (("dp4", "dp=4"), ("tp4", "tp=4"), ("pp2dp2", "pp=2,dp=2")):
        _copy(rank, f"{root}/a", f"{root}/{name}")
        shutil.rmtree(f"{root}/{name}/step-{K + 1:08d}", ignore_errors=True) if rank == 0 else None
        r = _run(layout, f"{root}/{name}")
        out[name] = (r.start_step, r.losses)
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * abs(b)


def test_resume_at_other_layouts(tmp_path) -> None:
    root = str(tmp_path)
    results = run_ranks(_four_ranks, 4, args=(root,), timeout_s=240)
    res = results[0]
    full_a, full_b = res["a"][1], res["b"][1]
    assert res["a"][0] == 0 and len(full_a) == K + 1 and len(full_b) == K + 1
    for name in ("dp4", "tp4", "pp2dp2"):
        start, losses = res[name]
        assert start == K, (name, start)
        assert len(losses) == 1 and _close(losses[0], full_a[K]), (name, losses, full_a)
    # single-rank resumes, in this process: (dp=2,tp=2) -> dp=1 and (pp=2,tp=2) -> (pp=1,tp=1)
    for src, full in (("a", full_a), ("b", full_b)):
        dst = f"{root}/{src}-single"
        shutil.copytree(f"{root}/{src}", dst)
        r = _run("single", dst)
        assert r.start_step == K and len(r.losses) == 1 and _close(r.losses[0], full[K]), (
            src,
            r.losses,
            full,
        )
