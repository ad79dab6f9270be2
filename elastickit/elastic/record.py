"""The `recovery` event of a generation, from every rank's timestamps (pure)."""

from __future__ import annotations

import itertools
from typing import Any

from .membership import Plan
from .rundir import Phases, RecoveryRecord

__all__ = ["recovery_record"]


def recovery_record(plan: Plan, times: list[dict[str, Any]]) -> RecoveryRecord:
    """The `recovery` event of `plan` from every rank's timestamps (pure; see `Phases`)."""

    def latest(name: str) -> float | None:
        vals = [t[name] for t in times if t.get(name) is not None]
        return max(vals) if vals else None

    detected = plan.detected_at
    if plan.cause == "join":
        voted = [t["voted"] for t in times if t.get("voted") is not None]
        fault = min(voted) if voted else detected
    else:
        fault = plan.fault_time if plan.fault_time is not None else detected
    marks = [fault, detected, latest("aborted"), latest("formed"), latest("built"), latest("restored"), times[0].get("first")]
    bounds = []
    for m in marks:
        prev = bounds[-1] if bounds else fault
        bounds.append(max(prev, m) if m is not None else prev)
    diffs = [b - a for a, b in itertools.pairwise(bounds)]
    phases = Phases(detect_s=diffs[0], abort_s=diffs[1], rendezvous_s=diffs[2], start_s=diffs[3], restore_s=diffs[4], first_step_s=diffs[5])
    restores = [t.get("restore") or {} for t in times]
    step = restores[0].get("step", 0)
    tiers = {r.get("tier") for r in restores}
    last = [t["last_step"] for t in times if t.get("last_step") is not None]
    node = plan.failed_node
    ranks = plan.failed_ranks
    if plan.cause == "join":
        ranks = tuple(plan.active.index(m) for m in plan.joined)
        node = plan.joined[0].split(".")[0] if plan.joined else None
    return RecoveryRecord(
        cause=plan.cause,
        ranks=tuple(ranks),
        node=int(node) if node is not None and str(node).isdigit() else node,
        phases=phases,
        restore={
            "tier": "peer" if "peer" in tiers else restores[0].get("tier"),
            "step": step,
            "bytes": sum(int(r.get("bytes", 0)) for r in restores),
        },
        lost_steps=max(0, max(last) - step) if last else 0,
        old_layout=plan.prev_layout or "",
        new_layout=plan.layout,
        world_size=plan.world_size,
        extra={
            "generation": plan.gen,
            "grad_accum": plan.grad_accum,
            "old_world_size": plan.prev_world,
            "spares": len(plan.spares),
            "in_process": True,
            "mttr_s": round(bounds[-1] - fault, 4),
            "failed_members": list(plan.failed),
            "stuck_members": list(plan.stuck),  # alive, beating, but their training loop stopped
            "joined_members": list(plan.joined),
        },
    )
