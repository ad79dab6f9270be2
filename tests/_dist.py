"""Shared helper for multi-process tests: run a top-level function on N spawned gloo ranks.

    from tests._dist import run_ranks

    def _work(rank: int, world_size: int, out_dir: str) -> float:   # top level of a module
        ...                                                         # process group is ready
        return value

    results = run_ranks(_work, world_size=2, args=(str(tmp_path),), timeout_s=120)
    # results[r] is what rank r returned

Each rank runs in a fresh `spawn`ed process with the default process group initialised on a
`FileStore` in a private temporary folder (no TCP port at all), `torch.set_num_threads(1)`, and
the env variables RANK / WORLD_SIZE / LOCAL_RANK set. `fn(rank, world_size, *args)` must be a
top-level function of an importable module (a test module is fine) and return something
picklable. The rank's return value is written to a file *before* teardown, because gloo's
`destroy_process_group` sometimes aborts (SIGABRT); a rank that returned counts as a success
whatever its exit code. Teardown is deliberate: barrier, then destroy_process_group.

If any rank raises, the others are given a few seconds and then killed (they are probably
blocked in a collective), and `RankError` is raised with each failing rank's traceback.
If the ranks do not finish within `timeout_s`, all are killed and `RankError` says which
ranks had not finished.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["RankError", "run_ranks"]


class RankError(RuntimeError):
    """One or more spawned ranks failed or timed out; the message holds each rank's cause."""


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    work_dir: str,
    backend: str,
) -> None:
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    result_path = os.path.join(work_dir, f"result_{rank}.pkl")
    error_path = os.path.join(work_dir, f"error_{rank}.txt")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.FileStore(os.path.join(work_dir, "store"), world_size)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        tmp = result_path + ".tmp"
        with open(tmp, "wb") as f:
            pickle.dump(value, f)
        os.replace(tmp, result_path)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        with open(error_path, "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    # Deliberate teardown; failures here do not change the (already written) result.
    try:
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001, S110 - the result is already on disk
        pass
    os._exit(0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    backend: str = "gloo",
    error_grace_s: float = 5.0,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` spawned ranks; return the results.

    Raises `RankError` naming each failed rank (with its traceback) or each rank that had not
    finished after `timeout_s` seconds.
    """
    import multiprocessing as mp
    import sys

    # Spawned children copy the parent's sys.path; pytest's importlib mode does not put the
    # repository root there, so the children could not import `tests.*`. Add it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ek_dist_") as work_dir:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, r, world_size, tuple(args), work_dir, backend),
                daemon=False,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()

        def done(r: int) -> bool:
            return os.path.exists(os.path.join(work_dir, f"result_{r}.pkl"))

        def failed(r: int) -> bool:
            return os.path.exists(os.path.join(work_dir, f"error_{r}.txt"))

        deadline = time.monotonic() + timeout_s
        first_error_at: float | None = None
        timed_out = False
        while True:
            if all(done(r) or not procs[r].is_alive() for r in range(world_size)):
                break
            now = time.monotonic()
            if first_error_at is None and any(failed(r) for r in range(world_size)):
                first_error_at = now
            if first_error_at is not None and now - first_error_at > error_grace_s:
                break
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.05)
        # Ranks that returned may still be tearing down; give them a moment, then kill.
        for p in procs:
            p.join(timeout=5.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)

        problems: list[str] = []
        results: list[Any] = []
        for r, p in enumerate(procs):
            if done(r):
                with open(os.path.join(work_dir, f"result_{r}.pkl"), "rb") as f:
                    results.append(pickle.load(f))
                continue
            results.append(None)
            if failed(r):
                with open(os.path.join(work_dir, f"error_{r}.txt")) as f:
                    problems.append(f"rank {r} raised:\n{f.read()}")
            elif timed_out:
                problems.append(f"rank {r} had not finished after {timeout_s:.0f} s")
            else:
                problems.append(
                    f"rank {r} did not finish (exit code {p.exitcode}; killed after another "
                    "rank failed, or crashed)"
                )
        if problems:
            raise RankError("\n".join(problems))
        return results
