"""Re-forming the process group in the same processes, with the ranks permuted (what the
elastic runtime does after a node is lost and another comes back): the new generation's
FSDP2 model and optimizer state must describe this rank's shards, not the rank the process had
in an earlier generation of the same world size."""

from __future__ import annotations

import os

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]


def _reform(rank: int, world: int, tmp: str) -> list[list[float]]:
    import torch.distributed as dist
    from elastickit.checkpoint.plan.pieces import default_pieces

    from elastickit.elastic.reform import forget_process_groups
    from elastickit.trainer.loop import TrainConfig, build_job

    forget_process_groups()  # the helper's group: this test forms its own generations
    store = dist.FileStore(os.path.join(tmp, "store"), world)
    out = []
    for gen, new_rank in enumerate([rank, (rank + 1) % world, rank]):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"gen{gen}", store), rank=new_rank, world_size=world)
        job = build_job(TrainConfig(model="tiny", layout=f"dp={world}", steps=4, global_batch=12, grad_accum=2))
        losses = [job.train_step(s) for s in range(2)]
        # Every shard, parameters and AdamW moments alike (the moments are made by DTensor ops),
        # is where this rank's mesh coordinate says it is.
        for name, p in job.model.named_parameters():
            default_pieces(name, p)
            for key, t in job.optimizer.state[p].items():
                if hasattr(t, "placements"):
                    default_pieces(f"{name}/{key}", t)
        out.append(losses)
        dist.barrier()
        forget_process_groups()
    return out


def test_regenerations_with_permuted_ranks_keep_shards_and_losses_right(tmp_path):
    results = run_ranks(_reform, world_size=3, args=(str(tmp_path),), timeout_s=170)
    # Every generation trains the same two steps from the same init: the same losses, on every rank.
    first = results[0][0]
    for per_rank in results:
        for losses in per_rank:
            assert losses == pytest.approx(first, rel=1e-6)
