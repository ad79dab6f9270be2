"""Real multi-rank jobs for the torture runs: N processes, a real TCPStore, a gloo process group.

Like torchrun, the parent (the "agent") hosts the TCPStore and the ranks connect to it; each job
talks under its own key prefix, so that a restarted job never reads a killed one's keys. Ranks
are forked from a forkserver that imported torch and elastickit once: a job starts in a fraction
of a second instead of the two seconds an import costs, so that a CI run can kill many jobs.

Each rank writes `ready-<r>` and its results as JSON files in the job directory; the parent kills
ranks with SIGKILL (one, then the rest, as torchrun tears a job down when a worker dies).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.device_mesh",
    "torch.distributed.tensor",
    "torch.distributed.checkpoint.state_dict",
    "elastickit",
    "elastickit.api",
    "elastickit.cli.main",
    "tests.torture.job",
]
_CTX: Any = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        if _ROOT not in sys.path:
            sys.path.insert(0, _ROOT)
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(_PRELOAD)
    return _CTX


class Agent:
    """Hosts the TCPStore of every job it starts (like torchrun's agent)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.port = self.store.port
        self._jobs = 0

    def start(
        self,
        fn: Callable[..., Any],
        world_size: int,
        job_dir: str,
        args: tuple[Any, ...] = (),
        *,
        crash: dict[int, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> Job:
        """Start `fn(rank, world_size, job_dir, *args)` on `world_size` ranks.

        `crash`: rank -> a CrashPoint as JSON, armed in that rank before anything runs.
        """
        os.makedirs(job_dir, exist_ok=True)
        self._jobs += 1
        prefix = f"job{self._jobs}-{os.getpid()}"
        ctx = _context()
        procs = []
        for r in range(world_size):
            p = ctx.Process(
                target=_rank_main,
                args=(
                    fn,
                    r,
                    world_size,
                    self.port,
                    prefix,
                    job_dir,
                    args,
                    (crash or {}).get(r),
                    env or {},
                ),
                daemon=True,
            )
            p.start()
            procs.append(p)
        return Job(procs=procs, dir=job_dir, started=time.monotonic())

    def close(self) -> None:
        del self.store


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    prefix: str,
    job_dir: str,
    args: tuple[Any, ...],
    crash: str | None,
    env: dict[str, str],
) -> None:
    from datetime import timedelta

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        **env,
    )
    try:
        if crash:
            from tests.torture.crashpoints import CrashPoint, install

            # Counted from `crashpoints.arm()` on: the job arms it once it restored (the
            # instants aim at its saves; a restore's own event must not shift them).
            install(
                CrashPoint.from_json(crash),
                log_path=os.path.join(job_dir, f"crashed-{rank}.json"),
                armed=False,
            )
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.PrefixStore(
            prefix, dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        )
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
        )
        out = fn(rank, world_size, job_dir, *args)
        _write_json(os.path.join(job_dir, f"result-{rank}.json"), out)
    except BaseException:  # noqa: BLE001 - reported to the parent through the job directory
        with open(os.path.join(job_dir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    # gloo's teardown sometimes aborts; the result is on disk already.
    os._exit(0)


def _child_main(fn: Callable[..., Any], args: tuple[Any, ...], out: str) -> None:
    try:
        fn(*args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(out, "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def run_in_child(fn: Callable[..., Any], *args: Any, timeout_s: float = 120) -> None:
    """Run `fn(*args)` in a fresh process forked from the preloaded server; raise its error."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ek_child_") as d:
        out = os.path.join(d, "error.txt")
        p = _context().Process(target=_child_main, args=(fn, args, out), daemon=True)
        p.start()
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join()
            raise RuntimeError(f"{fn.__name__} did not finish within {timeout_s} s")
        if os.path.exists(out):
            with open(out) as f:
                raise RuntimeError(f"{fn.__name__} failed:\n{f.read()}")


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


@dataclass
class Job:
    """A running job: its rank processes and directory."""

    procs: list[Any]
    dir: str
    started: float
    killed: list[int] = field(default_factory=list)

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def read(self, name: str) -> Any:
        try:
            with open(self.file(name)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def errors(self) -> dict[int, str]:
        out = {}
        for r in range(len(self.procs)):
            try:
                with open(self.file(f"error-{r}.txt")) as f:
                    # A rank may be writing it right now: never an empty message.
                    out[r] = f.read() or "(the rank is still writing its error)"
            except FileNotFoundError:
                pass
        return out

    def alive(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.is_alive()]

    def wait_files(self, names: list[str], timeout_s: float) -> bool:
        """Wait until every file exists; False when a rank exits first or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(os.path.exists(self.file(n)) for n in names):
                return True
            if self.errors() or len(self.alive()) < len(self.procs):
                return all(os.path.exists(self.file(n)) for n in names)
            time.sleep(0.01)
        return False

    def wait_exit(self, timeout_s: float, *, any_rank: bool = False) -> bool:
        """Wait until every rank (or any rank) has exited; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            n = len(self.alive())
            if n == 0 or (any_rank and n < len(self.procs)):
                return True
            time.sleep(0.005)
        return False

    def kill(self, ranks: list[int] | None = None) -> None:
        """SIGKILL these ranks (default: all) and reap them."""
        for r in ranks if ranks is not None else range(len(self.procs)):
            p = self.procs[r]
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.killed.append(r)
        for r in ranks if ranks is not None else range(len(self.procs)):
            self.procs[r].join(timeout=10)

    def exit_codes(self) -> list[int | None]:
        return [p.exitcode for p in self.procs]
