"""Save throughput: the same sharded state (2 ranks, ~1 GiB in all) saved by elastickit,
torch.save, safetensors.torch.save_file and torch.distributed.checkpoint.save, in one run.

    .venv/bin/python benchmarks/bench_save.py [--gib 1.0] [--repeats 3] [--dir /tmp/ekbench]

Every method makes its files durable (fsync) inside the timed region, since a checkpoint that
is not on disk is not a checkpoint; elastickit and safetensors are also timed to the page cache
only. Each method runs in fresh processes, so peak RSS is its own. Writes
results/save.md, results/save.json and results/save.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bar_chart, machine, peak_rss_bytes, spawn, write_table  # noqa: E402

METHODS = ["elastickit", "elastickit (no fsync)", "safetensors", "safetensors (no fsync)", "torch.save", "dcp.save"]


def _fsync_files(paths: list[str], directory: str) -> None:
    for path in [*paths, directory]:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _rank(rank: int, world: int, method: str, gib: float, out_dir: str) -> dict:
    import torch
    import torch.distributed as dist

    n_tensors = 32
    per_rank = int(gib * (1 << 30) / world)
    numel = per_rank // 4 // n_tensors
    g = torch.Generator().manual_seed(rank)
    state = {f"layers.{rank}.{i}.weight": torch.randn(numel, generator=g) for i in range(n_tensors)}
    import torch.distributed.checkpoint  # noqa: F401 - imports outside the timed region for all

    dest = os.path.join(out_dir, method.replace(" ", "_").replace("(", "").replace(")", ""))
    if rank == 0:
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
    ck = None
    if method.startswith("elastickit"):
        import elastickit as ek

        # Built once per job in real use, so outside the timed region (like the imports).
        # One tier (persistent), so that the time is the write to disk, as for the others.
        from elastickit.checkpoint.tiers import Tiers

        ck = ek.Checkpointer(dest, fsync="no fsync" not in method, rng=False, tiers=Tiers(memory=None))
    base_rss = peak_rss_bytes()
    dist.barrier()
    t0 = time.perf_counter()
    if ck is not None:
        ck.save(1, {"model": state})
        ck.wait()  # durable: the throughput of a save counts until it is on disk
    elif method.startswith("safetensors"):
        from safetensors.torch import save_file

        p = os.path.join(dest, f"rank{rank}.safetensors")
        save_file(state, p)
        if "no fsync" not in method:
            _fsync_files([p], dest)
    elif method == "torch.save":
        p = os.path.join(dest, f"rank{rank}.pt")
        torch.save(state, p)
        _fsync_files([p], dest)
    elif method == "dcp.save":
        import torch.distributed.checkpoint as dcp

        dcp.save(state, storage_writer=dcp.FileSystemWriter(dest, sync_files=True))
    dist.barrier()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": per_rank, "extra_rss": peak_rss_bytes() - base_rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="total state size in GiB (split over 2 ranks)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/ekbench_save")
    args = ap.parse_args()
    world = 2
    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for rep in range(args.repeats):
        for m in METHODS:  # interleaved, so drift hits every method alike
            r = spawn(_rank, world, m, args.gib, args.dir)
            results[m].append({"seconds": max(x["seconds"] for x in r), "bytes": sum(x["bytes"] for x in r),
                               "extra_rss": max(x["extra_rss"] for x in r)})
            print(f"rep {rep} {m:24s} {results[m][-1]['seconds']:.3f} s", flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    rows, med = [], {}
    for m in METHODS:
        secs = sorted(x["seconds"] for x in results[m])
        med[m] = secs[len(secs) // 2]
        total = results[m][0]["bytes"]
        rss = max(x["extra_rss"] for x in results[m])
        rows.append([m, f"{med[m]:.3f}", f"{min(secs):.3f}", f"{total / med[m] / 1e9:.2f}", f"{rss / 2**20:.0f}"])
    ratio = med["safetensors"] / med["elastickit"]
    ratio_nf = med["safetensors (no fsync)"] / med["elastickit (no fsync)"]
    notes = [
        f"Machine: {machine()}. State: {args.gib:g} GiB fp32 in 32 tensors per rank, 2 ranks (gloo), "
        f"median of {args.repeats} interleaved runs. Extra RSS: peak RSS of a rank minus its RSS before the save.",
        f"elastickit throughput vs safetensors.torch.save_file (both durable): **{ratio:.2f}x**; "
        f"both to the page cache: **{ratio_nf:.2f}x** (target >= 0.8x).",
    ]
    md = write_table("save", "Save throughput, 2 ranks", ["method", "median s", "best s", "GB/s", "extra RSS MiB"], rows, notes,
                     {"args": vars(args), "results": results, "median_s": med})
    bar_chart("save", "Save throughput (GB/s, higher is better)", METHODS,
              [results[m][0]["bytes"] / med[m] / 1e9 for m in METHODS], "GB/s")
    print(md)


if __name__ == "__main__":
    main()
