"""Shared pieces of the benchmarks: spawning ranks, peak RSS, result tables and charts."""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's resident set size now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """The peak RSS within a `with` block above the RSS at its start, sampled every 2 ms.

    Unlike `peak_rss_bytes` (the process's high-water mark), a block that follows a hungrier
    setup still shows its own peak.
    """

    def __init__(self) -> None:
        self.extra = 0
        self._stop = threading.Event()

    def __enter__(self) -> RssPeak:
        self._base = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.extra = max(self.extra, rss_bytes() - self._base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = max(self.extra, rss_bytes() - self._base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = fn(rank, world, *args)
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 900) -> list[Any]:
    """Run fn(rank, world, *args) on `world` fresh processes; return each rank's JSON result."""
    import multiprocessing as mp
    import tempfile

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r")
        procs = [ctx.Process(target=_rank_entry, args=(fn, r, world, port, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world):
            path = f"{out}.{r}.json"
            if not os.path.exists(path):
                raise RuntimeError(f"benchmark rank {r} produced no result (exit code {procs[r].exitcode})")
            with open(path) as f:
                results.append(json.load(f))
        return results


def write_table(name: str, title: str, header: list[str], rows: list[list[Any]], notes: list[str], data: Any) -> str:
    """Write results/<name>.md and results/<name>.json; return the markdown."""
    os.makedirs(RESULTS, exist_ok=True)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines += ["", *notes, ""]
    md = "\n".join(lines)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    return md


def bar_chart(name: str, title: str, labels: list[str], values: list[float], ylabel: str) -> str:
    """A PNG bar chart in results/<name>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(labels, values, color=["#2a7" if "elastickit" in lab else "#88a" for lab in labels])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    path = os.path.join(RESULTS, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def machine() -> str:
    import platform

    import torch

    return f"{os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"
