"""Local + peer tiers across 2 simulated nodes of 2 ranks: losing a node's local tier loses nothing."""

import os
import shutil

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist]


def _model(seed: int, rank: int):
    import torch

    # Each rank holds its own layers under their own names (as pipeline stages do), so every
    # rank's file matters and nothing is deduplicated away.
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({f"r{rank}": torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 4))})


def _save(rank: int, world: int, base: str):
    import torch

    import elastickit as ek
    from elastickit.checkpoint.tiers import TierSpec, Tiers

    model = _model(rank, rank)
    tiers = Tiers(local=TierSpec(path=os.path.join(base, "node{node}")), peer=True, persistent=None, ranks_per_node=2)
    with ek.Checkpointer(os.path.join(base, "root"), tiers=tiers, layout={"world": world}) as ck:
        for step in (1, 2):
            with torch.no_grad():
                model[f"r{rank}"][0].weight.add_(step)
            ck.save(step, {"model": model, "shared": {"note": "x"}}).durable.result()
    return {k: v.tolist() for k, v in model.state_dict().items()}


def _restore(rank: int, world: int, base: str):
    import elastickit as ek
    from elastickit.checkpoint.events import read_events
    from elastickit.checkpoint.tiers import TierSpec, Tiers

    model = _model(100 + rank, rank)
    tiers = Tiers(local=TierSpec(path=os.path.join(base, "node{node}")), peer=True, persistent=None, ranks_per_node=2)
    with ek.Checkpointer(os.path.join(base, "root"), tiers=tiers, layout={"world": world}) as ck:
        shared: dict = {}
        step = ck.restore({"model": model, "shared": shared})
        assert shared == {"note": "x"}
    events = read_events(os.path.join(base, "root", "events.jsonl")) if rank == 0 else []
    return {"step": step, "state": {k: v.tolist() for k, v in model.state_dict().items()},
            "tiers": [e["tier"] for e in events if e["type"] == "restore"]}


@pytest.mark.timeout(240)
def test_restore_from_peers_after_a_node_is_wiped(tmp_path):
    base = str(tmp_path)
    saved = run_ranks(_save, 4, (base,), timeout_s=150)
    # Each node's local directory holds its own ranks' files and its buddy node's, in the run's
    # own directory (a local tier path shared by two runs never mixes them).
    for node, (own, ward) in {0: ((0, 1), (2, 3)), 1: ((2, 3), (0, 1))}.items():
        (run,) = [d for d in os.listdir(os.path.join(base, f"node{node}")) if d.startswith("run-")]
        names = sorted(os.listdir(os.path.join(base, f"node{node}", run, "step-00000002")))
        assert names == ["manifest.json"] + sorted(f"rank-{r:05d}.safetensors" for r in own + ward)
    shutil.rmtree(os.path.join(base, "node1"))  # node 1 lost its memory and local storage
    restored = run_ranks(_restore, 4, (base,), timeout_s=150)
    for r in range(4):
        assert restored[r]["step"] == 2
        assert restored[r]["state"] == saved[r], f"rank {r} restored other values"
    assert restored[0]["tiers"] == ["local"]
