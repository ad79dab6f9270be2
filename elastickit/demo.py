"""The end-to-end stories behind `elastickit demo` (no typer, no rich: the CLI prints `Stage`s).

`run` (the default) is elastic recovery:

1. 4 simulated nodes (torchrun elastic agents, one worker each) train the reference GPT (FSDP2,
   dp=4, global batch 24);
2. one node is killed with SIGKILL (its whole process group) mid-run: the survivors notice in
   milliseconds, re-form in-process and go on at dp=3 with more gradient accumulation, restored
   from the freshest checkpoint (peer copies of the dead node's shards);
3. the node comes back (a new agent): the job grows back to dp=4 at a step boundary;
4. the loss curve is compared with the same training without failures (one process, the same
   global batch) and every global sample is checked to be used exactly once;
5. the MTTR table: each recovery by phase.

Its run directory is kept (`runs/demo` by default; `prepare_run_dir` replaces the previous demo
run there) for `elastickit dashboard` and `elastickit top` to show afterwards.

`run_checkpoints` is the checkpoint story:

1. Train the reference GPT on 2 ranks (dp=2, FSDP2) without interruption: the reference losses.
2. Train again with elastickit checkpoints, and stop half-way (the failure).
3. Restore in a fresh process group at the same layout: the next losses equal the reference
   bit for bit.
4. Restore the same checkpoint into another layout (tp=2: tensor parallel, fused QKV and padded
   vocabulary resharded by rules): the next losses match within 1e-5.
5. Verify every checksum of the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STEPS = 8
STOP = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """One stage of the demo and what it showed."""

    title: str
    ok: bool
    detail: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _train(rank: int, world: int, layout: str, ckpt: str | None, stop: int | None) -> dict[str, Any]:
    from elastickit.trainer.loop import TrainConfig, run_training

    cfg = TrainConfig(model="tiny", layout=layout, steps=STEPS, stop_after=stop, ckpt_dir=ckpt, ckpt_every=2)
    res = run_training(cfg)
    return {"start": res.start_step, "losses": res.losses}


def run_checkpoints(workdir: str | None = None, on_stage: Callable[[Stage], None] = lambda s: None) -> list[Stage]:
    """Run every stage of the checkpoint story; returns them (and hands each to `on_stage`)."""
    from elastickit.inspection import verify
    from elastickit.spawn import run_ranks

    stages: list[Stage] = []
    own = workdir is None
    tmp = tempfile.mkdtemp(prefix="elastickit-demo-") if own else workdir
    ckpt = os.path.join(tmp, "ckpt")
    ckpt_other = os.path.join(tmp, "ckpt-tp2")

    def timed(fn: Callable[[], Stage]) -> Stage:
        t0 = time.perf_counter()
        s = fn()
        s = Stage(title=s.title, ok=s.ok, detail=s.detail, losses=s.losses, seconds=time.perf_counter() - t0)
        stages.append(s)
        on_stage(s)
        return s

    ref: list[float] = []

    def reference() -> Stage:
        out = run_ranks(_train, 2, ("dp=2", None, None))[0]
        ref.extend(out["losses"])
        return Stage(title=f"train {STEPS} steps on dp=2 (2 ranks, FSDP2), uninterrupted", ok=len(ref) == STEPS,
                     detail="reference losses", losses=ref)

    def interrupted() -> Stage:
        out = run_ranks(_train, 2, ("dp=2", ckpt, STOP))[0]
        shutil.copytree(ckpt, ckpt_other)  # the same checkpoints, for the other-layout restart
        same = out["losses"] == ref[:STOP]
        return Stage(title=f"train with elastickit checkpoints every 2 steps; the job dies after step {STOP}",
                     ok=same, detail="losses identical to the reference so far" if same else "losses differ from the reference",
                     losses=out["losses"])

    def resume_same() -> Stage:
        out = run_ranks(_train, 2, ("dp=2", ckpt, None))[0]
        exact = out["start"] == STOP and out["losses"] == ref[STOP:]
        return Stage(title=f"restart in a fresh process group, same layout (dp=2): resume at step {out['start']}",
                     ok=exact, detail="next losses bit-identical to the uninterrupted run" if exact else
                     f"losses differ: {out['losses']} vs {ref[STOP:]}", losses=out["losses"])

    def resume_other() -> Stage:
        out = run_ranks(_train, 2, ("tp=2", ckpt_other, None))[0]
        if out["start"] != STOP or len(out["losses"]) != STEPS - STOP:
            return Stage(title="restart into another layout (tp=2)", ok=False,
                         detail=f"resumed at step {out['start']}, expected {STOP}", losses=out["losses"])
        worst = max(abs(a - b) / abs(b) for a, b in zip(out["losses"], ref[STOP:], strict=True))
        ok = worst <= 1e-5
        return Stage(title=f"restart into another layout (tp=2: tensor parallel, resharded by rules) at step {out['start']}",
                     ok=ok, detail=f"next losses within {worst:.1e} relative of the uninterrupted run (tolerance 1e-5)",
                     losses=out["losses"])

    def check() -> Stage:
        report = verify(ckpt)
        return Stage(title=f"verify step {report['step']}: every checksum", ok=report["ok"],
                     detail=f"{report['files_checked']} files, {report['bytes_checked']} bytes verified")

    try:
        for fn in (reference, interrupted, resume_same, resume_other, check):
            if not timed(fn).ok:
                break
    finally:
        if own:
            shutil.rmtree(tmp, ignore_errors=True)
    return stages


ELASTIC_NODES = 4
ELASTIC_STEPS = 120
KILL_AT = 20
GLOBAL_BATCH = 24
DEMO_RUN = os.path.join("runs", "demo")
DEMO_MARK = ".elastickit-demo"
"""A file in the demo's run directory: a later demo may replace that directory, nothing else."""


def prepare_run_dir(path: str) -> str:
    """Make `path` the demo's fresh, empty run directory (its absolute path): a previous demo
    run there is replaced; a directory holding anything else is refused (RequestError), never
    emptied."""
    from elastickit.checkpoint.errors import RequestError

    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RequestError(f"{path} is a file; the demo keeps its run in a directory: move it away "
                           "or give --workdir DIR", path=path)
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, DEMO_MARK)):
            raise RequestError(f"{path} holds files that are not an elastickit demo run (no {DEMO_MARK}); "
                               "remove it or give --workdir DIR", path=path)
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, DEMO_MARK), "w", encoding="utf-8") as f:
        f.write("made by `elastickit demo`; the next demo replaces this directory\n")
    return path


@dataclass(frozen=True, slots=True, kw_only=True)
class Story:
    """What the elastic demo showed, besides its stages."""

    stages: list[Stage]
    recoveries: list[dict[str, Any]]
    curve: list[tuple[int, int, float, float]]
    """(step, world size, loss, loss of the run without failures) every 10 steps."""
    run_dir: str = ""
    """The run directory, kept for `elastickit dashboard` and `elastickit top`."""


def reference_losses(steps: int, global_batch: int = GLOBAL_BATCH) -> list[float]:
    """The same training without failures: one process, the same global batch (in one
    microbatch: the same mean gradient as any split into microbatches, up to rounding)."""
    import torch

    from elastickit.trainer.loop import TrainConfig, build_job

    torch.set_num_threads(1)  # more threads than free cores make every op spin (OpenMP)
    job = build_job(TrainConfig(model="tiny", layout="single", steps=steps, global_batch=global_batch, grad_accum=1))
    return [job.train_step(s) for s in range(steps)]


def run(run_dir: str = DEMO_RUN, on_stage: Callable[[Stage], None] = lambda s: None,
        on_line: Callable[[str], None] = lambda s: None) -> Story:
    """The elastic story (see the module docstring) in run directory `run_dir`, which is kept
    (a previous demo run there is replaced; see `prepare_run_dir`)."""
    from elastickit.elastic.rundir import read_recoveries, read_steps
    from elastickit.elastic.simulate import Cluster, SimRequest, parse_node_fault, worker_flags

    run_dir = prepare_run_dir(run_dir)
    stages: list[Stage] = []

    def stage(title: str, ok: bool, detail: str, t0: float) -> None:
        s = Stage(title=title, ok=ok, detail=detail, seconds=time.perf_counter() - t0)
        stages.append(s)
        on_stage(s)

    t0 = time.perf_counter()
    req = SimRequest(
        nodes=ELASTIC_NODES,
        run=run_dir,
        worker_args=worker_flags(steps=ELASTIC_STEPS, global_batch=GLOBAL_BATCH, micro_batch=2),
        faults=(parse_node_fault(f"killnode:node=1:step={KILL_AT}", ELASTIC_NODES),),
        rejoin_after_s=1.0,
        quiet=True,
    )
    code = Cluster(req, on_line=on_line).run(timeout_s=600)
    rows = read_steps(run_dir)
    recs = read_recoveries(os.path.join(run_dir, "events.jsonl"))
    worlds = [r["world_size"] for r in rows]
    stage(f"{ELASTIC_NODES} simulated nodes train {ELASTIC_STEPS} steps; node 1 is killed (SIGKILL to its "
          f"process group) after step {KILL_AT} and comes back", code == 0 and len(rows) == ELASTIC_STEPS,
          f"every step done; world sizes {_runs(worlds)}", t0)
    kill = next((r for r in recs if r["cause"] == "killnode"), None)
    # The killed node's return (on a loaded machine another node may also be left out and
    # come back: that join is not the one this stage is about).
    join = next((r for r in recs if r["cause"] == "join" and kill is not None and r.get("node") == kill.get("node")), None)
    t1 = time.perf_counter()
    if kill is not None:
        stage(f"the survivors went on at {kill['new_layout']} (grad_accum {kill.get('grad_accum')}) in-process",
              True, f"{kill['mttr_s']:.2f} s from the kill to the first step on the new layout; restored step "
              f"{kill['restore']['step']} from the {kill['restore']['tier']} tier, {kill['lost_steps']} step(s) redone", t1)
    else:
        stage("the survivors went on without the killed node", False, "no recovery event was written", t1)
    if join is not None:
        stage(f"node {join['node']} came back; the job grew back to {join['new_layout']}", True,
              f"{join['mttr_s']:.2f} s from the agreed step to the first step at {join['world_size']} ranks", t1)
    else:
        stage("the node came back and the job grew back", False,
              "the node was not back before the last step (a loaded machine starts processes slowly)", t1)
    t2 = time.perf_counter()
    ref = reference_losses(ELASTIC_STEPS)
    worst = max((abs(r["loss"] - ref[r["step"] - 1]) / abs(ref[r["step"] - 1]) for r in rows), default=1.0)
    stage("the loss continues the uninterrupted curve (one process, the same global batch)", worst <= 5e-5,
          f"largest relative difference {worst:.1e} over {len(rows)} steps (tolerance 5e-5: the sums of another layout)", t2)
    tiles = [tuple(r["samples"]) for r in rows] == [(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH) for i in range(len(rows))]
    stage("every global sample used exactly once in the final trajectory", tiles,
          f"samples 0..{len(rows) * GLOBAL_BATCH - 1} in order, none skipped or repeated" if tiles else
          "the steps' sample ranges do not tile the data", t2)
    curve = [(r["step"], r["world_size"], r["loss"], ref[r["step"] - 1]) for r in rows if r["step"] % 10 == 0]
    return Story(stages=stages, recoveries=recs, curve=curve, run_dir=run_dir)


def _runs(values: list[int]) -> str:
    """[4, 4, 3, 3, 4] -> '4 x2, 3 x2, 4 x1'."""
    out: list[list[int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return ", ".join(f"{v} x{n}" for v, n in out)
