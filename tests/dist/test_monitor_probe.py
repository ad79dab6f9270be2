"""The probing backend sees every collective: FSDP2 + tensor parallel, and the plain API."""

from __future__ import annotations

import collections

import pytest
from elastickit.monitor import register_backend

from tests._dist import run_ranks

# Registered at import: the spawned ranks import this module before init_process_group.
BACKEND = register_backend()

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]


def _fsdp_tp_and_plain(rank: int, world_size: int) -> dict[str, object]:
    import torch
    import torch.distributed as dist
    from elastickit.monitor.probe import PROBE
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    assert dist.get_backend() == BACKEND
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    PROBE.buffer.drain()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    dist.barrier()  # every Work of the step has completed on this rank after this
    step_records = PROBE.buffer.drain()
    fsdp_tp = collections.Counter(r.op for r in step_records)
    groups = {r.group: r.group_ranks for r in step_records}
    complete = all(r.exit_s >= r.enter_s for r in step_records)

    t = torch.ones(4)
    if rank == 0:
        dist.send(t, 1)
    elif rank == 1:
        dist.recv(t, 0)
    dist.all_to_all_single(torch.zeros(4), torch.ones(4))
    dist.broadcast(t, 0)
    dist.barrier()
    ops = [
        dist.P2POp(dist.isend, t, (rank + 1) % world_size),
        dist.P2POp(dist.irecv, torch.zeros(4), (rank - 1) % world_size),
    ]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    work = dist.all_reduce(torch.ones(1000), async_op=True)
    work.wait()
    dist.barrier()
    plain = PROBE.buffer.drain()
    peers = sorted({(r.op, r.peer) for r in plain if r.is_p2p})
    allreduce_bytes = [r.num_bytes for r in plain if r.op == "allreduce"]
    return {
        "fsdp_tp": dict(fsdp_tp),
        "groups": groups,
        "complete": complete,
        "plain": dict(collections.Counter(r.op for r in plain)),
        "peers": peers,
        "allreduce_bytes": allreduce_bytes,
        "errors": PROBE.errors,
    }


def test_probe_sees_fsdp2_tp_step_and_plain_ops() -> None:
    results = run_ranks(_fsdp_tp_and_plain, world_size=4, timeout_s=150, backend=BACKEND)
    for rank, res in enumerate(results):
        fsdp_tp = res["fsdp_tp"]
        # FSDP2 gathers and reduce-scatters over dp; DTensor all-reduces over tp.
        assert fsdp_tp.get("all_gather_single", 0) >= 1, (rank, fsdp_tp)
        assert fsdp_tp.get("reduce_scatter_single", 0) >= 1, (rank, fsdp_tp)
        assert fsdp_tp.get("allreduce", 0) >= 1, (rank, fsdp_tp)
        assert res["complete"]
        # The mesh's dp and tp groups carry their global ranks: dp {r%2, r%2+2}, tp pairs.
        member_sets = {tuple(sorted(v)) for v in res["groups"].values()}
        assert tuple(sorted({rank % 2, rank % 2 + 2})) in member_sets, member_sets
        assert tuple(sorted({rank // 2 * 2, rank // 2 * 2 + 1})) in member_sets, member_sets
        plain = res["plain"]
        for op in ("all_to_all_single", "broadcast", "barrier", "send", "recv"):
            assert plain.get(op, 0) >= 1, (rank, op, plain)
        # batch_isend_irecv: send to the next rank, receive from the previous one.
        assert ("send", (rank + 1) % 4) in res["peers"], res["peers"]
        assert ("recv", (rank - 1) % 4) in res["peers"], res["peers"]
        assert 4000 in res["allreduce_bytes"]
        assert res["errors"] == 0
