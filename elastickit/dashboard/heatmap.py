"""The step-time heatmap: ranks x recent steps, slow ranks marked with their straggler score.

A cell is how long the other ranks waited for this rank in that step: the step's median wait
inside collectives minus this rank's own wait (at least 0). In a synchronous job every rank's
step time is about the same (the others wait for the slowest), so the step time hides the
culprit; the rank the others wait for is the one that waited least (DESIGN.md section 5).
MegaScale's heatmap colours whole machines by step time; this one names the rank and measures
its cost in seconds. Step time, wait and busy time (step time minus wait) come along for the
tooltip. The straggler score is the monitor detector's: the mean over the last steps of the
same gap divided by the step time.
"""

from __future__ import annotations

import statistics
from typing import Any

from elastickit.monitor.detector import DetectorConfig, straggler_scores

from .logs import RunLogs
from .records import Recovery, parse_all
from .windows import columns, complete, latest_segment

WINDOW_STEPS = 40
SCORE_STEPS = 10


def heatmap_panel(logs: RunLogs, *, window: int = WINDOW_STEPS) -> dict[str, Any]:
    """The heatmap's data: columns (step, segment), rows (ranks), cells: seconds the others
    waited for the rank (`held_s`), with its step time, wait and busy time."""
    recoveries, _ = parse_all(logs.events, "recovery", Recovery.from_dict)
    cols = columns(logs.summaries, recoveries)[-window:]
    if not cols:
        return {"available": False, "why": "no per-rank step summaries (ranks.jsonl): run the "
                "job with the monitor (elastickit train --events ..., or monitor.attach(ranks_path=...))"}
    ranks = sorted({r for c in cols for r in c.ranks})
    busy: list[list[float | None]] = []
    step_s: list[list[float | None]] = []
    wait_s: list[list[float | None]] = []
    for r in ranks:
        b, t, w = [], [], []
        for c in cols:
            s = c.ranks.get(r)
            b.append(None if s is None else round(max(0.0, s.step_time_s - s.wait_s), 6))
            t.append(None if s is None else round(s.step_time_s, 6))
            w.append(None if s is None else round(s.wait_s, 6))
        busy.append(b)
        step_s.append(t)
        wait_s.append(w)
    held: list[list[float | None]] = [[None] * len(cols) for _ in ranks]
    for j in range(len(cols)):
        waits = [wait_s[i][j] for i in range(len(ranks)) if wait_s[i][j] is not None]
        if len(waits) < 2:
            continue
        med = statistics.median(waits)
        for i in range(len(ranks)):
            w = wait_s[i][j]
            if w is not None:
                held[i][j] = round(max(0.0, med - w), 6)
    current = latest_segment(cols)
    scores = straggler_scores(complete(current)[-SCORE_STEPS:])
    threshold = DetectorConfig().slow_rank_min_gap
    # The monitor's own findings since this incarnation began (its first summary).
    began = min(s.time_s for c in current for s in c.ranks.values())
    flagged = {
        r
        for e in logs.events
        if e.get("type") == "slow_rank" and e["time"] >= began
        for r in e.get("ranks", [])
        if isinstance(r, int)
    }
    slow = sorted(r for r in ranks if scores.get(r, 0.0) >= threshold or r in flagged)
    return {
        "available": True,
        "steps": [c.step for c in cols],
        "segments": [c.segment for c in cols],
        "ranks": ranks,
        "busy_s": busy,
        "step_s": step_s,
        "wait_s": wait_s,
        "held_s": held,
        "scores": {str(r): round(scores[r], 4) for r in sorted(scores)},
        "threshold": threshold,
        "slow": slow,
        "detected": sorted(flagged),
    }
