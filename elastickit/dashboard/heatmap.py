"""The step-time heatmap: ranks x recent steps, slow ranks marked with their straggler score.

A cell is a rank's busy time in a step: its step time minus the time it spent waiting inside
collectives, coloured by its share of the step. In a synchronous job every rank's step time is about the same (the others wait
for the slowest), so the raw step time hides the culprit; the busy time shows it (MegaScale's
heatmap colours whole machines by step time; this one names the rank). The straggler score is
the monitor detector's: the mean over steps of (median wait - own wait) / step time.
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
    """The heatmap's data: columns (step, segment), rows (ranks), cells busy seconds."""
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
    # Colour: the share of the step (its median step time over ranks) the rank was busy.
    # Bounded (about 0..1) and meaningful with any number of ranks: the straggler is near 1,
    # the ranks waiting for it lower.
    share: list[list[float | None]] = [[None] * len(cols) for _ in ranks]
    for j in range(len(cols)):
        times = [step_s[i][j] for i in range(len(ranks)) if step_s[i][j] is not None]
        med = statistics.median(times) if times else 0.0
        for i in range(len(ranks)):
            v = busy[i][j]
            if v is not None and med > 0:
                share[i][j] = round(min(v / med, 9.99), 3)
    current = latest_segment(cols)
    scores = straggler_scores(complete(current)[-SCORE_STEPS:])
    threshold = DetectorConfig().slow_rank_min_gap
    first_step = min(c.step for c in current)
    flagged = {
        r
        for e in logs.events
        if e.get("type") == "slow_rank" and isinstance(e.get("step"), int) and e["step"] >= first_step
        for r in e.get("ranks", [])
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
        "share": share,
        "scores": {str(r): round(scores[r], 4) for r in sorted(scores)},
        "threshold": threshold,
        "slow": slow,
        "detected": sorted(flagged),
    }
