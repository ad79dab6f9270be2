"""Save and restore an FSDP2 + tensor-parallel model with AdamW from 2 and 4 gloo ranks."""

import os

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist]


def _build(seed: int, dp: int, tp: int):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 22), torch.nn.GELU(), torch.nn.Linear(22, 10))
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optim, mesh


def _step(model, optim, step: int, dp_rank: int, dp: int) -> float:
    import torch
    import torch.distributed as dist

    g = torch.Generator().manual_seed(step)
    x = torch.randn(4 * dp, 10, generator=g)[dp_rank * 4 : (dp_rank + 1) * 4]
    optim.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    optim.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item()


def _full(model, optim):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {}
    for k, v in get_model_state_dict(model).items():
        out[f"model/{k}"] = v.full_tensor().clone()
    for fqn, st in get_optimizer_state_dict(model, optim)["state"].items():
        for k, v in st.items():
            out[f"optim/{fqn}/{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


def _work(rank: int, world: int, root: str, dp: int, tp: int, other: tuple[int, int]):
    import torch

    import elastickit as ek

    model, optim, mesh = _build(0, dp, tp)
    dp_rank = mesh["dp"].get_local_rank()
    for s in range(2):
        _step(model, optim, s, dp_rank, dp)
    ck = ek.Checkpointer(root, layout=mesh)
    ck.save(2, {"model": model, "optim": optim})  # returns at once; the copy is fenced
    saved = _full(model, optim)
    ref = _step(model, optim, 2, dp_rank, dp)  # the optimizer step waits for the snapshot
    ck.close()  # durable on the persistent tier

    # Fresh model (another seed), same layout: bit-exact state and next-step loss.
    model2, optim2, _ = _build(99, dp, tp)
    assert ek.Checkpointer(root, layout=mesh).restore({"model": model2, "optim": optim2}) == 2
    restored = _full(model2, optim2)
    same = sorted(k for k in saved if torch.equal(saved[k], restored[k]))
    got = _step(model2, optim2, 2, dp_rank, dp)

    # Another layout in the same world (different FSDP / TP split): same logical values.
    dp3, tp3 = other
    model3, optim3, mesh3 = _build(7, dp3, tp3)
    ek.Checkpointer(root, layout=mesh3).restore({"model": model3, "optim": optim3})
    resharded = _full(model3, optim3)
    same3 = sorted(k for k in saved if torch.equal(saved[k], resharded[k]))
    return {"keys": sorted(saved), "same": same, "same3": same3, "ref": ref, "got": got}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,dp,tp,other", [(2, 2, 1, (1, 2)), (4, 2, 2, (4, 1))])
def test_fsdp2_tp_save_restore_bit_exact(tmp_path, world, dp, tp, other):
    results = run_ranks(_work, world, (str(tmp_path), dp, tp, other), timeout_s=200)
    for r in results:
        assert len(r["keys"]) == 4 + 4 * 3
        assert r["same"] == r["keys"], "state after restore differs from the saved state"
        assert r["got"] == r["ref"], "next-step loss after restore is not bit-identical"
        assert r["same3"] == r["keys"], "restore into another layout changed values"
    names = sorted(os.listdir(tmp_path / "step-00000002"))
    assert names == ["manifest.json"] + [f"rank-{r:05d}.safetensors" for r in range(world)]
