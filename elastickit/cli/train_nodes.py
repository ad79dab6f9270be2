"""`elastickit train --nodes N`: the elastic half of the train command (simulated nodes)."""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence

from ._console import err, out


def train_nodes(
    *,
    nodes: int,
    min_nodes: int | None,
    nproc_per_node: int,
    run: str | None,
    ckpt: str | None,
    layout: str,
    steps: int,
    model: str,
    every: int,
    inject: Sequence[str],
    global_batch: int | None,
    micro_batch: int | None,
    rejoin_after: float | None,
    hang_timeout: float | None,
    dp_mode: str,
    step_sleep: float | None = None,
) -> int:
    """Check everything, run the simulated nodes to the end, print the recoveries; exit code."""
    from elastickit.elastic.rundir import mttr_lines, read_recoveries, read_steps
    from elastickit.elastic.simulate import Cluster, nodes_request

    run = run or time.strftime("runs/train-%Y%m%d-%H%M%S")
    req, first = nodes_request(
        nodes=nodes,
        run=run,
        trainer={
            "steps": steps, "model": model, "layout": layout, "every": every, "ckpt": ckpt,
            "global_batch": global_batch, "micro_batch": micro_batch, "hang_timeout": hang_timeout,
            "dp_mode": dp_mode, "step_sleep": step_sleep,
        },
        inject=inject,
        min_nodes=min_nodes,
        nproc_per_node=nproc_per_node,
        rejoin_after_s=rejoin_after,
    )
    err.print(f"elastickit train: {nodes} simulated node(s) x {nproc_per_node} worker(s), model {model}, "
              f"{steps} steps; starts on {first}; run directory {run}")
    cluster = Cluster(req, on_line=lambda s: err.print(s))
    # SIGTERM stops every node like Ctrl-C does (Cluster.run's cleanup), not just this process.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = cluster.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    rows = read_steps(run)
    recs = read_recoveries(cluster.rundir.events)
    if rows:
        out.print(f"done: steps 1..{rows[-1]['step']} (the last line of each step in {run}/steps.jsonl), "
                  f"final loss {rows[-1]['loss']:.6f}, {len(recs)} recover{'y' if len(recs) == 1 else 'ies'}")
    for line in mttr_lines(recs):
        out.print(line)
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
