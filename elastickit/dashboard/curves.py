"""Curves: loss and step time across restarts, restarts marked.

Points come from steps.jsonl in file order, cut into one series per incarnation: a new series
starts where a step number does not grow (a restore replayed it) or the world changed. Each
recovery is a marker at the step it restored. Long runs are thinned to `MAX_POINTS` per curve
(every k-th point, and always the last), so the page stays light.
"""

from __future__ import annotations

from typing import Any

from .logs import RunLogs
from .records import Recovery, number, parse_all

MAX_POINTS = 1500


def curves_panel(logs: RunLogs, *, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Series of (step, loss, step_s, time) per incarnation, and restart markers."""
    series: list[list[dict[str, Any]]] = []
    prev: dict[str, Any] | None = None
    for line in logs.steps:
        new = prev is None or line["step"] <= prev["step"] or (
            line.get("world_size") != prev.get("world_size")
        )
        if new:
            series.append([])
        series[-1].append({
            "step": line["step"],
            "loss": number(line, "loss"),
            "step_s": number(line, "step_s"),
            "time": line["time"],
        })
        prev = line
    total = sum(len(s) for s in series)
    stride = max(1, -(-total // max_points))
    if stride > 1:
        series = [[p for i, p in enumerate(s) if i % stride == 0 or i == len(s) - 1] for s in series]
    recoveries, _ = parse_all(logs.events, "recovery", Recovery.from_dict)
    markers = [
        {"time": r.time, "step": r.restore_step, "cause": r.cause, "new_layout": r.new_layout,
         "lost_steps": r.lost_steps}
        for r in sorted(recoveries, key=lambda r: r.time)
    ]
    return {
        "available": bool(series),
        "why": "" if series else "no steps.jsonl in the run directory yet",
        "series": series,
        "markers": markers,
        "stride": stride,
        "num_points": total,
    }
