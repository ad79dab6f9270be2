"""Resharding restore: ~1 GiB of state saved by 4 ranks, loaded by 3, elastickit vs DCP.

    .venv/bin/python benchmarks/bench_reshard.py [--gib 1.0] [--repeats 2] [--dir /tmp/ekreshard]

One 4-rank gloo job saves the same DTensor state (16 fp32 matrices, Shard(0) over 4 ranks) both
as an elastickit checkpoint (`write_checkpoint`) and with `torch.distributed.checkpoint.save`.
Then, for each repeat and each method, a fresh 3-rank job allocates the target DTensors
(Shard(0) over 3 ranks: every source shard is cut differently) and loads them: elastickit plans
with `plan_reads` and streams with `execute` (memory-mapped slices, checksums verified); DCP runs
`torch.distributed.checkpoint.load`, which reshards by itself. The timed region is barrier ->
load -> barrier (slowest rank). Peak RSS is sampled every 5 ms during the load on every rank and
reported as the largest rank's peak and its growth over the allocated targets. Every loaded value
is checked before a figure is reported. Both checkpoints sit in the page cache (just written).

Writes results/reshard.md and results/reshard.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, spawn, write_table

N_TENSORS = 16
COLS = 4096


def _rows(gib: float) -> int:
    rows = int(gib * (1 << 30) / 4 / COLS / N_TENSORS)
    return rows - rows % 12  # divisible by 4 (save) so the source shards are even


def _expected(i: int, offset: int, rows: int):
    import torch

    start = offset * COLS
    return (
        (torch.arange(start, start + rows * COLS, dtype=torch.int64) % 8_388_608).float() + i
    ).view(rows, COLS)


def _save(rank: int, world: int, root: str, gib: float) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from elastickit.checkpoint.coord import StoreCoordinator
    from elastickit.checkpoint.drivers.writer import SaveRequest, write_checkpoint
    from elastickit.checkpoint.plan.pieces import save_items
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    rows = _rows(gib)
    mesh = init_device_mesh("cpu", (world,))
    local = rows // world
    state = {
        f"model/w{i}": DTensor.from_local(
            _expected(i, rank * local, local), mesh, [Shard(0)], run_check=False
        )
        for i in range(N_TENSORS)
    }
    coord = StoreCoordinator(
        dist.distributed_c10d._get_default_store(), rank=rank, world_size=world, prefix="bench"
    )
    req = SaveRequest(
        root=os.path.join(root, "ek"),
        step=1,
        items=save_items(state),
        fsync=False,
    )
    write_checkpoint(req, coord)
    dcp.save(
        {k.replace("model/", ""): v for k, v in state.items()},
        checkpoint_id=os.path.join(root, "dcp"),
    )
    dist.barrier()
    return {"rows": rows}


def _load(rank: int, world: int, root: str, gib: float, method: str) -> dict:
    import psutil
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from elastickit.checkpoint.format.directory import StepDir
    from elastickit.checkpoint.plan.pieces import load_items
    from elastickit.reshard.executor import execute
    from elastickit.reshard.planner import plan_reads
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor import empty as dt_empty
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    rows = _rows(gib)
    mesh = init_device_mesh("cpu", (world,))
    targets = {
        f"model/w{i}": dt_empty((rows, COLS), device_mesh=mesh, placements=[Shard(0)])
        for i in range(N_TENSORS)
    }
    for t in targets.values():
        t.to_local().zero_()  # touch the pages: the targets count in the baseline, not the peak
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    dist.barrier()
    t0 = time.perf_counter()
    if method == "elastickit":
        path = os.path.join(root, "ek", "step-00000001")
        source = StepDir(path)
        items = load_items(targets)
        plan = plan_reads(source.manifest, [(it.key, it.pieces) for it in items])
        with torch.no_grad():
            execute(plan, source, {it.key: it.tensor for it in items})
    else:
        sd = {k.replace("model/", ""): v for k, v in targets.items()}
        dcp.load(sd, checkpoint_id=os.path.join(root, "dcp"))
    dist.barrier()
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    # check every value loaded
    shape, offset = compute_local_shape_and_global_offset((rows, COLS), mesh, [Shard(0)])
    for i in range(N_TENSORS):
        if not torch.equal(targets[f"model/w{i}"].to_local(), _expected(i, offset[0], shape[0])):
            raise AssertionError(f"{method}: rank {rank} loaded wrong values into w{i}")
    return {"seconds": seconds, "peak_rss": peak[0], "base_rss": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/ekreshard")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    rows = spawn(_save, 4, args.dir, args.gib)[0]["rows"]
    total = N_TENSORS * rows * COLS * 4
    runs: dict[str, list[dict]] = {"elastickit": [], "dcp.load": []}
    for _ in range(args.repeats):
        for method, results in runs.items():
            res = spawn(
                _load, 3, args.dir, args.gib, "elastickit" if method == "elastickit" else "dcp"
            )
            results.append(
                {
                    "seconds": max(r["seconds"] for r in res),
                    "peak_rss": max(r["peak_rss"] for r in res),
                    "growth": max(r["peak_rss"] - r["base_rss"] for r in res),
                }
            )
            print(method, results[-1], flush=True)
    mib = 1 << 20
    best = {m: min(rs, key=lambda r: r["seconds"]) for m, rs in runs.items()}
    rows_md = [
        [
            m,
            f"{b['seconds']:.2f}",
            f"{total / b['seconds'] / 1e9:.2f}",
            f"{b['peak_rss'] / mib:.0f}",
            f"{b['growth'] / mib:.0f}",
            ", ".join(f"{r['seconds']:.2f}" for r in runs[m]),
        ]
        for m, b in best.items()
    ]
    ek, dc = best["elastickit"], best["dcp.load"]
    notes = [
        (
            f"State: {N_TENSORS} fp32 matrices [{rows}, {COLS}] = {total / (1 << 30):.2f} GiB, saved by 4 ranks "
            "(DTensor Shard(0)), loaded by 3 ranks (Shard(0): every target shard straddles two source shards)."
        ),
        (
            f"Machine: {machine()}; gloo; both checkpoints in the page cache. Seconds: barrier -> load -> barrier "
            "(slowest rank), best of the repeats. Peak RSS: the largest rank's peak sampled every 5 ms during the "
            "load; growth: that peak minus the RSS with the targets allocated (memory-mapped file pages count)."
        ),
        (
            f"elastickit vs DCP: {dc['seconds'] / ek['seconds']:.2f}x DCP's speed; peak RSS "
            f"{ek['peak_rss'] / mib:.0f} MiB vs {dc['peak_rss'] / mib:.0f} MiB. elastickit also verifies an xxh3 "
            "checksum of every stored tensor it reads; DCP verifies nothing."
        ),
    ]
    md = write_table(
        "reshard",
        "Resharding restore: 4 ranks -> 3 ranks",
        ["method", "seconds", "GB/s", "peak RSS (MiB)", "RSS growth (MiB)", "all runs (s)"],
        rows_md,
        notes,
        {"total_bytes": total, "runs": runs},
    )
    print(md)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
