"""When to checkpoint: every N steps, every T seconds, or `auto` (Young/Daly).

Young/Daly: with a checkpoint costing C seconds of training time and failures arriving every
M seconds on average, the interval that loses the least time is about sqrt(2 * C * M).

Time-based decisions must be identical on every rank, so they are taken on rank 0 and shared in
the round every checkpoint already makes: the policy turns "every T seconds" into "the next
checkpoint is at step S" from the measured step time (`next_due_step`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .events import read_events

DEFAULT_MTBF_S = 3 * 3600.0  # Llama 3: 419 interruptions in 54 days, about one per 3 hours
FAILURE_EVENTS = ("crash", "hang", "restart", "rank_failure")


def young_daly_interval_s(cost_s: float, mtbf_s: float) -> float:
    """The checkpoint interval that minimises lost time: sqrt(2 * cost * MTBF)."""
    if cost_s < 0 or mtbf_s <= 0:
        raise ValueError(f"need cost_s >= 0 and mtbf_s > 0, got {cost_s}, {mtbf_s}")
    return math.sqrt(2.0 * cost_s * mtbf_s)


def mtbf_from_events(path: str) -> float | None:
    """Mean time between failures learned from an event log (JSON lines with `type`, `time`).

    None when the log holds fewer than one failure or spans no time.
    """
    records = read_events(path)
    times = [float(r["time"]) for r in records if "time" in r]
    failures = sum(1 for r in records if r.get("type") in FAILURE_EVENTS)
    if failures == 0 or len(times) < 2 or max(times) <= min(times):
        return None
    return (max(times) - min(times)) / failures


@dataclass(frozen=True, slots=True, kw_only=True)
class IntervalPolicy:
    """The checkpoint interval.

    Attributes:
        every: checkpoint when step % every == 0 (the default is every=1).
        every_seconds: checkpoint about every this many seconds of training.
        auto: Young/Daly from the measured blocking cost and `mtbf_s`.
        mtbf_s: mean time between failures for `auto` (None: learned from `events_path`, else
            DEFAULT_MTBF_S).
        events_path: an event log to learn the MTBF from.
    """

    every: int | None = None
    every_seconds: float | None = None
    auto: bool = False
    mtbf_s: float | None = None
    events_path: str | None = None

    def __post_init__(self) -> None:
        if sum([self.every is not None, self.every_seconds is not None, self.auto]) > 1:
            raise ValueError("choose one of every=N, every_seconds=T or auto=True")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {self.every_seconds}")
        if self.mtbf_s is not None and self.mtbf_s <= 0:
            raise ValueError(f"mtbf_s must be > 0, got {self.mtbf_s}")

    @property
    def step_based(self) -> bool:
        return self.every_seconds is None and not self.auto

    @property
    def every_n(self) -> int:
        return self.every or 1

    def mtbf(self) -> float:
        if self.mtbf_s is not None:
            return self.mtbf_s
        learned = mtbf_from_events(self.events_path) if self.events_path and os.path.exists(self.events_path) else None
        return learned or DEFAULT_MTBF_S

    def interval_s(self, cost_s: float) -> float:
        """Seconds between checkpoints for a time-based policy."""
        if self.every_seconds is not None:
            return self.every_seconds
        return young_daly_interval_s(cost_s, self.mtbf())

    def next_due_step(self, step: int, *, step_time_s: float, cost_s: float) -> int:
        """The step of the next checkpoint after one at `step` (time-based policies)."""
        if self.step_based:
            return (step // self.every_n + 1) * self.every_n
        if step_time_s <= 0:
            return step + 1
        return step + max(1, round(self.interval_s(cost_s) / step_time_s))
