"""The training job the torture runs kill: a tiny FSDP2 model trained with AdamW, saved every step.

Every rank writes, after each optimizer step, a digest of its own state (the local shards of
every parameter and optimizer tensor, and the data position) to `<work>/digests/rank-<r>/<step>`
before it calls `save`: whatever step a later job restores, its state must hash to the digest of
that step (bit-exact). Training is deterministic (fixed data per step, two-rank reductions), so
a step trained twice (after a restore to an older step) has the same digest.

Tier configurations (`TIER_CONFIGS`): every tier at once (memory, node-local with peer copies,
persistent), persistent only with zstd, node-local with peer copies only. Each rank is a node of
its own (`ranks_per_node=1`) so that peer copies cross "nodes" (`<work>/local/<node>`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

TIER_CONFIGS = ("all", "persistent-zstd", "local-peer")
#: The persistent tier on object storage (`EK_TORTURE_S3`: the URL; the endpoint and credentials
#: come from the environment), with a 17 MiB buffer so that rank 0's file goes up in parts (the
#: buffer is the same on every rank: rank 0 alone writes it, rank 1's file is one PUT).
OBJECT_CONFIGS = ("objstore",)
BIG_MIB = 17


def tiers(config: str, work: str, *, keep_local: int = 2, keep_persistent: int = 3) -> Any:
    from elastickit.checkpoint.tiers import Tiers, TierSpec

    local = TierSpec(
        path=os.path.join(work, "local", "{node}"), keep_last=keep_local, max_busy_fraction=1.0
    )
    if config == "all":
        return Tiers(
            local=local,
            peer=True,
            persistent=TierSpec(keep_last=keep_persistent, max_busy_fraction=1.0),
            ranks_per_node=1,
        )
    if config == "persistent-zstd":
        return Tiers(
            persistent=TierSpec(keep_last=keep_persistent, zstd_level=1, max_busy_fraction=1.0),
            ranks_per_node=1,
        )
    if config == "objstore":
        url = os.environ.get("EK_TORTURE_S3", "s3://unset/run")
        return Tiers(
            persistent=TierSpec(path=url, keep_last=keep_persistent, max_busy_fraction=1.0),
            ranks_per_node=1,
        )
    if config == "local-peer":
        return Tiers(local=local, peer=True, persistent=None, ranks_per_node=1)
    raise ValueError(f"unknown tier config {config!r}")


def build(seed: int = 0) -> tuple[Any, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 192), torch.nn.GELU(), torch.nn.Linear(192, 64))
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("dp",))
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optim


def train_step(model: Any, optim: Any, step: int, rank: int) -> None:
    import torch

    g = torch.Generator().manual_seed(1000 + step * 16 + rank)
    x = torch.randn(8, 64, generator=g)
    optim.zero_grad()
    model(x).pow(2).mean().backward()
    optim.step()


def digest(model: Any, optim: Any, data: Any) -> dict[str, str]:
    """name -> xxh3 of the bytes of this rank's local shard (parameters, optimizer state, data)."""
    import xxhash

    out = {}

    def local(t: Any) -> Any:
        return (t.to_local() if hasattr(t, "to_local") else t).detach().contiguous()

    for name, p in model.named_parameters():
        out[f"model/{name}"] = xxhash.xxh3_64_hexdigest(local(p).numpy().tobytes())
        for k, v in sorted(optim.state.get(p, {}).items()):
            if hasattr(v, "numpy") or hasattr(v, "to_local"):
                out[f"optim/{name}/{k}"] = xxhash.xxh3_64_hexdigest(local(v).numpy().tobytes())
    out["data"] = json.dumps(data, sort_keys=True)
    return out


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def run(rank: int, world_size: int, job_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """One job: restore the newest checkpoint, report it, then train and save every step.

    cfg: work (the campaign directory), config (a TIER_CONFIGS name), steps, step_s, timeout_s.
    """
    import elastickit as ek

    work = cfg["work"]
    model, optim = build()
    state: dict[str, Any] = {"model": model, "optim": optim, "data": {"pos": 0}}
    if cfg["config"] in OBJECT_CONFIGS:
        import torch

        g = torch.Generator().manual_seed(rank)
        state["big"] = {"buffer": torch.randn(BIG_MIB << 18, generator=g)}  # uploads in parts
    ck = ek.Checkpointer(
        os.path.join(work, "persistent"),
        every=1,
        tiers=tiers(cfg["config"], work),
        timeout_s=cfg.get("timeout_s", 60.0),
    )
    start = ck.restore(state)
    _write_json(
        os.path.join(job_dir, f"restored-{rank}.json"),
        {"step": start, "digest": digest(model, optim, state["data"])},
    )
    open(os.path.join(job_dir, f"ready-{rank}"), "w").close()
    from tests.torture import crashpoints

    crashpoints.arm()  # the kill instants aim at the saves, not at the restore above
    dig_dir = os.path.join(work, "digests", f"rank-{rank}")
    os.makedirs(dig_dir, exist_ok=True)
    for step in range(start, start + cfg["steps"]):
        train_step(model, optim, step, rank)
        state["data"] = {"pos": step + 1}
        path = os.path.join(dig_dir, f"{step + 1}.json")
        d = digest(model, optim, state["data"])
        if os.path.exists(path):
            with open(path) as f:
                if json.load(f) != d:  # training must be deterministic for the bit-exact check
                    raise AssertionError(f"rank {rank}: step {step + 1} trained twice differs")
        else:
            _write_json(path, d)
        ck.save(step + 1, state)
        if cfg.get("step_s"):
            time.sleep(cfg["step_s"])  # stands for the forward and backward of a real model
    ck.close()
    return {"start": start, "end": start + cfg["steps"]}
