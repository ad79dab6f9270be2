"""The end-to-end story behind `elastickit demo` (no typer, no rich: the CLI prints `Stage`s).

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


def run(workdir: str | None = None, on_stage: Callable[[Stage], None] = lambda s: None) -> list[Stage]:
    """Run every stage; returns them (and hands each to `on_stage` as it finishes)."""
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
