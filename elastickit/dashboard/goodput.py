"""Effective training time (ETTR) and badput by cause, from steps.jsonl and the event log.

Over the wall time from the first step's start to the newest step's end:
- productive: the step time of the final trajectory (the last line of each step wins), less
  the time checkpoints blocked training;
- lost work: steps run again after a restore (their earlier runs were thrown away);
- recovery: the phases of every recovery before its first step (detect, abort, rendezvous,
  worker start, restore; the first step itself is counted as a step);
- checkpoint: time `save` blocked the training thread;
- other: the rest (start-up, logging, data loading between steps, unexplained gaps).
ETTR = productive / wall (Google's goodput library calls it goodput; MegaScale, Llama 3 and
ByteRobust report it as effective training time ratio).
"""

from __future__ import annotations

from typing import Any

from .logs import RunLogs
from .records import CheckpointRecord, Recovery, final_steps, number, parse_all


def goodput(logs: RunLogs) -> dict[str, Any]:
    """{"available", "ettr", "wall_s", "productive_s", "badput_s": {cause: seconds}}."""
    if not logs.steps:
        return {"available": False, "why": "no steps.jsonl"}
    first, last = logs.steps[0], logs.steps[-1]
    start = first["time"] - (number(first, "step_s") or 0.0)
    end = last["time"]
    wall = end - start
    final = final_steps(logs.steps)
    kept = {id(line) for line in final.values()}
    run_s = sum(number(line, "step_s") or 0.0 for line in final.values())
    replayed = sum(number(line, "step_s") or 0.0 for line in logs.steps if id(line) not in kept)
    ckpts, _ = parse_all(logs.events, "checkpoint", CheckpointRecord.from_dict)
    blocking = sum(c.blocking_s for c in ckpts if start <= c.time <= end)
    recoveries, _ = parse_all(logs.events, "recovery", Recovery.from_dict)
    recovery = sum(
        sum(s for p, s in r.phases if p != "first_step_s") for r in recoveries if start <= r.time <= end
    )
    productive = max(0.0, run_s - blocking)
    other = max(0.0, wall - productive - replayed - blocking - recovery)
    return {
        "available": wall > 0,
        "ettr": round(productive / wall, 4) if wall > 0 else None,
        "wall_s": round(wall, 3),
        "productive_s": round(productive, 3),
        "badput_s": {
            "recovery": round(recovery, 3),
            "lost_work": round(replayed, 3),
            "checkpoint": round(blocking, 3),
            "other": round(other, 3),
        },
        "truncated": bool(dict(logs.dropped).get("steps.jsonl")),
    }
