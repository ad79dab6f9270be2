"""Per-rank step summaries (ranks.jsonl) cut into incarnations of the job and steps.

A restart replays steps (a step number appears again) and may change the world, so summaries
are first cut into segments, one per incarnation: a new segment starts at each recovery (its
restore began after every summary of the old incarnation and before any of the new one) and
wherever a rank reports a step it has already reported (a restart the log has no recovery
event for). Within a segment, the steps are keyed by number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from elastickit.monitor.summary import StepSummary

from .records import Recovery


@dataclass(frozen=True, slots=True, kw_only=True)
class StepColumn:
    """One step of one incarnation: every rank's summary of it."""

    segment: int
    step: int
    ranks: Mapping[int, StepSummary]


def boundaries(recoveries: Sequence[Recovery]) -> list[float]:
    """When each recovery's restore began (sorted): the cut between two incarnations."""
    out = []
    for r in recoveries:
        phases = dict(r.phases)
        out.append(r.time - phases["first_step_s"] - phases["restore_s"])
    return sorted(out)


def columns(summaries: Sequence[StepSummary], recoveries: Sequence[Recovery]) -> list[StepColumn]:
    """Every (incarnation, step) seen, in time order."""
    cuts = boundaries(recoveries)
    segment, ci = 0, 0
    last_step: dict[int, int] = {}
    cols: dict[tuple[int, int], dict[int, StepSummary]] = {}
    order: list[tuple[int, int]] = []
    for s in sorted(summaries, key=lambda s: s.time_s):
        while ci < len(cuts) and s.time_s >= cuts[ci]:
            segment, ci, last_step = segment + 1, ci + 1, {}
        if s.step <= last_step.get(s.rank, -1):
            segment, last_step = segment + 1, {}
        last_step[s.rank] = s.step
        key = (segment, s.step)
        if key not in cols:
            cols[key] = {}
            order.append(key)
        cols[key][s.rank] = s
    order.sort()
    return [StepColumn(segment=k[0], step=k[1], ranks=cols[k]) for k in order]


def latest_segment(cols: Sequence[StepColumn]) -> list[StepColumn]:
    """The columns of the newest incarnation."""
    if not cols:
        return []
    seg = cols[-1].segment
    return [c for c in cols if c.segment == seg]


def complete(cols: Sequence[StepColumn]) -> list[dict[int, StepSummary]]:
    """The steps every rank of the incarnation reported (what the detector looks at)."""
    world = {r for c in cols for r in c.ranks}
    return [dict(c.ranks) for c in cols if set(c.ranks) == world]
