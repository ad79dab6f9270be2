"""Run a function on N local ranks (spawned processes, gloo, a FileStore): the demo and the
benchmarks use it to stage small multi-rank runs without torchrun.

Results come back as JSON files (no pickle); a rank that raises makes the call raise with that
rank's message after the others are stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from elastickit.checkpoint.errors import RankFailure


def _entry(fn: Callable[..., Any], rank: int, world: int, args: tuple[Any, ...], work: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.FileStore(os.path.join(work, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        value = fn(rank, world, *args)
        with open(os.path.join(work, f"{rank}.json.tmp"), "w") as f:
            json.dump(value, f)
        os.replace(os.path.join(work, f"{rank}.json.tmp"), os.path.join(work, f"{rank}.json"))
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(work, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    try:  # deliberate teardown; gloo sometimes aborts here after everything succeeded
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001
        pass
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int, args: Sequence[Any] = (), *, timeout_s: float = 600) -> list[Any]:
    """`fn(rank, world, *args)` on `world` fresh processes; returns each rank's JSON result."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ek_ranks_") as work:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, tuple(args), work)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        failed_at = None
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if all(os.path.exists(os.path.join(work, f"{r}.json")) for r in range(world)):
                break
            if failed_at is None and any(os.path.exists(os.path.join(work, f"{r}.err")) for r in range(world)):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 5:
                break
            time.sleep(0.05)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results, causes = [], {}
        for r in range(world):
            path = os.path.join(work, f"{r}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
                continue
            results.append(None)
            err = os.path.join(work, f"{r}.err")
            causes[r] = "did not finish"
            if os.path.exists(err):
                with open(err) as f:
                    causes[r] = f.read().strip().splitlines()[-1]
        if causes:
            first = min(causes)
            raise RankFailure(f"rank {first} failed: {causes[first]}", causes=causes)
        return results
