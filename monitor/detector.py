"""The detector: a pure function from a window of summaries and heartbeats to anomaly events.

No torch, no torch.distributed, no clock: everything it needs is in its arguments, so it is
tested on synthetic data. The signals (DESIGN.md section 5):

- slow rank: collectives are homogeneous, every member leaves at about the same time, so the
  rank that arrived last waited least. A rank whose wait (exit - enter, on its own clock) is
  the shortest in most steps of the window, by a margin that is a real share of the step
  time, is the rank the others wait for.
- slow link: a pair whose point-to-point transfers are slow on both ends, step after step,
  compared with the other pairs; or a process group whose fastest member (the floor of the
  group's collective time) is slow compared with the other groups of the same size.
- hang: a rank has been inside a collective longer than a bound while some members never
  entered it (their last entered sequence number is lower). Waiters blocked behind another
  waiter are followed to the ranks that are not inside any operation: those are named.
- crash: a rank's process is gone, or its heartbeat stopped changing, without a clean close.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .summary import Heartbeat, StepSummary

EVENT_TYPES = ("slow_rank", "slow_link", "hang", "crash")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DetectorConfig:
    """Thresholds of the detector.

    Attributes:
        window_steps: complete steps (summaries from every rank) looked at.
        min_hits: steps of the window in which a rank or link must look anomalous.
        slow_rank_min_gap: a slow rank's wait is shorter than the median of the others' by
            at least this share of the step time.
        slow_link_ratio: a slow pair's (group's) per-op time is at least this multiple of the
            median of the other pairs (groups of the same size)...
        slow_link_min_s: ...and longer by at least this many seconds.
        hang_factor, hang_margin_s: a rank inside a collective for longer than
            hang_factor * typical step time + hang_margin_s is waiting on a hang.
        hang_initial_s: the bound before any complete step was seen.
        crash_silence_s: a heartbeat unchanged for this long means the rank is gone.
        warmup_steps: the collector ignores each rank's first summaries (lazy initialisation,
            first-touch allocations and imports make the first steps uneven).
    """

    window_steps: int = 5
    min_hits: int = 4
    slow_rank_min_gap: float = 0.1
    slow_link_ratio: float = 3.0
    slow_link_min_s: float = 0.005
    hang_factor: float = 1.0
    hang_margin_s: float = 0.5
    hang_initial_s: float = 10.0
    crash_silence_s: float = 1.0
    warmup_steps: int = 2

    def __post_init__(self) -> None:
        if self.window_steps < 1:
            raise ValueError(
                f"DetectorConfig: field 'window_steps' must be >= 1, got {self.window_steps}"
            )
        if not 1 <= self.min_hits <= self.window_steps:
            raise ValueError(
                f"DetectorConfig: field 'min_hits' must be in 1..window_steps, got {self.min_hits}"
            )
        for name in (
            "warmup_steps",
            "slow_rank_min_gap",
            "slow_link_ratio",
            "slow_link_min_s",
            "hang_factor",
            "hang_margin_s",
            "hang_initial_s",
            "crash_silence_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"DetectorConfig: field {name!r} must be >= 0")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ObservedHeartbeat:
    """A heartbeat as the collector saw it: `silent_s` since its `beat` last changed (the
    collector's clock), `exited` when the collector saw the process gone."""

    heartbeat: Heartbeat
    silent_s: float
    exited: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AnomalyEvent:
    """One finding. `ranks` are the blamed global ranks (a link: its two ends)."""

    type: str
    ranks: tuple[int, ...]
    step: int
    time_s: float
    op: str = ""
    group: str = ""
    seq: int = -1
    evidence: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    confidence: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(
                f"AnomalyEvent: field 'type' must be one of {EVENT_TYPES}, got {self.type!r}"
            )
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(
                f"AnomalyEvent: field 'confidence' must be in [0, 1], got {self.confidence}"
            )

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        """Identity for de-duplication: the same finding about the same ranks."""
        return (self.type, self.ranks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "ranks": list(self.ranks),
            "step": self.step,
            "time": self.time_s,
            "op": self.op,
            "group": self.group,
            "seq": self.seq,
            "evidence": dict(self.evidence),
            "confidence": round(self.confidence, 3),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AnomalyEvent:
        d = json.loads(text)
        try:
            return cls(
                type=d["type"],
                ranks=tuple(int(r) for r in d["ranks"]),
                step=int(d["step"]),
                time_s=float(d["time"]),
                op=str(d.get("op", "")),
                group=str(d.get("group", "")),
                seq=int(d.get("seq", -1)),
                evidence=dict(d.get("evidence", {})),
                confidence=float(d.get("confidence", 1.0)),
            )
        except KeyError as e:
            raise ValueError(f"AnomalyEvent: field {e.args[0]!r} is missing") from e


def complete_steps(
    summaries: Mapping[int, Sequence[StepSummary]], world_size: int, window: int
) -> list[dict[int, StepSummary]]:
    """The last `window` steps for which every rank sent a summary, oldest first."""
    by_step: dict[int, dict[int, StepSummary]] = {}
    for rank, items in summaries.items():
        for s in items:
            by_step.setdefault(s.step, {})[rank] = s
    full = [by_step[k] for k in sorted(by_step) if len(by_step[k]) == world_size]
    return full[-window:]


def straggler_scores(steps: Sequence[Mapping[int, StepSummary]]) -> dict[int, float]:
    """Per rank: mean over steps of (median wait - own wait) / step time, floored at 0.
    High means the others wait for this rank."""
    scores: dict[int, list[float]] = {}
    for step in steps:
        waits = {r: s.wait_s for r, s in step.items()}
        t = max(statistics.median(s.step_time_s for s in step.values()), 1e-9)
        med = statistics.median(waits.values())
        for r, w in waits.items():
            scores.setdefault(r, []).append(max(0.0, (med - w) / t))
    return {r: sum(v) / len(v) for r, v in scores.items()}


def _slow_ranks(
    steps: Sequence[Mapping[int, StepSummary]], cfg: DetectorConfig, now_s: float
) -> list[AnomalyEvent]:
    if len(steps) < cfg.window_steps or len(steps[0]) < 2:
        return []
    hits: dict[int, list[float]] = {}
    for step in steps:
        waits = {r: s.wait_s for r, s in step.items()}
        t = max(statistics.median(s.step_time_s for s in step.values()), 1e-9)
        slowest = min(waits, key=lambda r: waits[r])
        others = statistics.median(w for r, w in waits.items() if r != slowest)
        gap = (others - waits[slowest]) / t
        if gap >= cfg.slow_rank_min_gap:
            hits.setdefault(slowest, []).append(gap)
    events = []
    for rank, gaps in hits.items():
        if len(gaps) < cfg.min_hits:
            continue
        gap = statistics.median(gaps)
        conf = min(1.0, len(gaps) / len(steps) * min(1.0, gap / (2 * cfg.slow_rank_min_gap)))
        last = steps[-1]
        events.append(
            AnomalyEvent(
                type="slow_rank",
                ranks=(rank,),
                step=last[rank].step,
                time_s=now_s,
                op="*",
                evidence={
                    "steps": [s[rank].step for s in steps],
                    "hits": len(gaps),
                    "median_gap_share": round(gap, 4),
                    "waits_s": {str(r): round(s.wait_s, 6) for r, s in last.items()},
                    "step_time_s": round(last[rank].step_time_s, 6),
                },
                confidence=conf,
            )
        )
    return events


def _pair_times(step: Mapping[int, StepSummary]) -> dict[tuple[int, int], float]:
    """Per unordered pair: the smaller of the two ends' mean p2p time (both ends must see it
    slow, so a receiver waiting for a slow sender does not blame the link)."""
    per_end: dict[tuple[int, int], float] = {}
    for r, s in step.items():
        for p in s.peers:
            if p.num_ops > 0 and p.peer >= 0:
                per_end[(r, p.peer)] = p.wait_s / p.num_ops
    pairs = {}
    for (a, b), d in per_end.items():
        if a < b and (b, a) in per_end:
            pairs[(a, b)] = min(d, per_end[(b, a)])
    return pairs


def _group_floors(step: Mapping[int, StepSummary]) -> dict[tuple[str, tuple[int, ...]], float]:
    """Per group: the smallest per-op wait among its members (the transfer time proper)."""
    seen: dict[tuple[str, tuple[int, ...]], list[float]] = {}
    for s in step.values():
        for g in s.groups:
            if g.num_ops > 0:
                seen.setdefault((g.group, tuple(g.ranks)), []).append(g.wait_s / g.num_ops)
    return {k: min(v) for k, v in seen.items() if len(v) == len(k[1]) and len(k[1]) >= 2}


def _slow_links(
    steps: Sequence[Mapping[int, StepSummary]], cfg: DetectorConfig, now_s: float
) -> list[AnomalyEvent]:
    if len(steps) < cfg.window_steps:
        return []

    def outliers(values: Mapping[Any, float], peers_of: Any) -> dict[Any, tuple[float, float]]:
        found = {}
        for k, d in values.items():
            others = [values[o] for o in peers_of(k) if o != k]
            if not others:
                continue
            base = statistics.median(others)
            if d >= cfg.slow_link_ratio * base and d - base >= cfg.slow_link_min_s:
                found[k] = (d, base)
        return found

    p2p_hits: dict[tuple[int, int], list[tuple[float, float]]] = {}
    grp_hits: dict[tuple[str, tuple[int, ...]], list[tuple[float, float]]] = {}
    for step in steps:
        pairs = _pair_times(step)
        for k, v in outliers(pairs, lambda k, pairs=pairs: pairs.keys()).items():
            p2p_hits.setdefault(k, []).append(v)
        floors = _group_floors(step)
        for k, v in outliers(
            floors, lambda k, floors=floors: [o for o in floors if len(o[1]) == len(k[1])]
        ).items():
            grp_hits.setdefault(k, []).append(v)
    events = []
    last_step = max(s.step for s in steps[-1].values())
    for (a, b), vals in p2p_hits.items():
        if len(vals) >= cfg.min_hits:
            d = statistics.median(v[0] for v in vals)
            base = statistics.median(v[1] for v in vals)
            events.append(
                AnomalyEvent(
                    type="slow_link",
                    ranks=(a, b),
                    step=last_step,
                    time_s=now_s,
                    op="send/recv",
                    evidence={
                        "source": "p2p",
                        "hits": len(vals),
                        "pair_op_s": round(d, 6),
                        "other_pairs_op_s": round(base, 6),
                    },
                    confidence=min(1.0, len(vals) / len(steps)),
                )
            )
    for (group, ranks), vals in grp_hits.items():
        if len(vals) >= cfg.min_hits and not any(set(e.ranks) <= set(ranks) for e in events):
            d = statistics.median(v[0] for v in vals)
            base = statistics.median(v[1] for v in vals)
            conf = min(1.0, len(vals) / len(steps)) * (1.0 if len(ranks) == 2 else 0.5)
            events.append(
                AnomalyEvent(
                    type="slow_link",
                    ranks=tuple(sorted(ranks)),
                    step=last_step,
                    time_s=now_s,
                    op="collective",
                    group=group,
                    evidence={
                        "source": "group",
                        "hits": len(vals),
                        "group_op_s": round(d, 6),
                        "other_groups_op_s": round(base, 6),
                    },
                    confidence=conf,
                )
            )
    return events


def hang_bound_s(steps: Sequence[Mapping[int, StepSummary]], cfg: DetectorConfig) -> float:
    """How long a rank may sit inside one operation before it counts as waiting on a hang."""
    if not steps:
        return cfg.hang_initial_s
    typical = statistics.median(s.step_time_s for step in steps for s in step.values())
    return cfg.hang_factor * typical + cfg.hang_margin_s


def _hangs(
    heartbeats: Mapping[int, ObservedHeartbeat], gone: set[int], bound_s: float, now_s: float
) -> list[AnomalyEvent]:
    if gone:  # a crashed rank stalls everyone: that is the finding, not a hang
        return []
    # A rank that closed has left the job (after an error elsewhere): never a culprit.
    gone = gone | {r for r, o in heartbeats.items() if o.heartbeat.state == "closed"}
    alive = {r: o.heartbeat for r, o in heartbeats.items() if r not in gone}
    # waits_for[r] = [(missing ranks, op)] for every operation r is inside.
    waits_for: dict[int, list[tuple[list[int], Any]]] = {}
    for r, hb in alive.items():
        for op in hb.in_flight:
            if op.peer == -1:
                missing = [
                    m
                    for m in op.ranks
                    if m != r and (m not in alive or alive[m].entered_seq(op.group) < op.seq)
                ]
            elif op.peer >= 0:
                other = "send" if op.op.startswith("recv") else "recv"
                peer_hb = alive.get(op.peer)
                missing = (
                    [op.peer]
                    if peer_hb is None or peer_hb.entered_p2p_seq(op.group, other, r) < op.seq
                    else []
                )
            else:
                missing = []
            missing = [m for m in missing if m not in gone]
            if missing:
                waits_for.setdefault(r, []).append((missing, op))
    stale = [
        (r, op, missing)
        for r, items in waits_for.items()
        for missing, op in items
        if op.age_s >= bound_s
    ]
    if not stale:
        return []
    # Follow waiters to the ranks that are inside no operation at all: the root causes.
    roots: dict[int, tuple[Any, list[int], float]] = {}
    for r, op, missing in stale:
        frontier, seen = list(missing), {r}
        while frontier:
            m = frontier.pop()
            if m in seen:
                continue
            seen.add(m)
            if m in waits_for:
                frontier.extend(x for ms, _ in waits_for[m] for x in ms)
            elif m in alive and not alive[m].in_flight or m not in alive:
                prev = roots.get(m)
                blocking = op if m in missing else None
                if prev is None or (prev[0] is None and blocking is not None):
                    roots[m] = (blocking, [r], op.age_s)
                else:
                    prev[1].append(r)
    events = []
    if roots:
        by_op: dict[tuple[str, str, int], list[int]] = {}
        for m, (op, _, _) in roots.items():
            key = (op.op, op.group, op.seq) if op is not None else ("", "", -1)
            by_op.setdefault(key, []).append(m)
        for (opname, group, seq), culprits in by_op.items():
            blocking_op = next((roots[m][0] for m in culprits if roots[m][0] is not None), None)
            if blocking_op is None:  # blocked only indirectly: attach to the oldest stale op
                _, blocking_op, _ = max(stale, key=lambda x: x[1].age_s)
                opname, group, seq = blocking_op.op, blocking_op.group, blocking_op.seq
            waiting = sorted({w for m in culprits for w in roots[m][1]})
            waited = max(roots[m][2] for m in culprits)
            step = max((alive[w].step for w in waiting if w in alive), default=-1)
            events.append(
                AnomalyEvent(
                    type="hang",
                    ranks=tuple(sorted(culprits)),
                    step=step,
                    time_s=now_s,
                    op=opname,
                    group=group,
                    seq=seq,
                    evidence={
                        "group_ranks": list(blocking_op.ranks),
                        "waiting_ranks": waiting,
                        "waited_s": round(waited, 3),
                        "bound_s": round(bound_s, 3),
                        "last_entered": {
                            str(m): (alive[m].entered_seq(group) if m in alive else None)
                            for m in culprits
                        },
                    },
                    confidence=0.9 if all(m in alive for m in culprits) else 0.6,
                )
            )
    else:  # everyone involved is inside an operation: a deadlock or a stuck transport
        r, op, missing = max(stale, key=lambda x: x[1].age_s)
        events.append(
            AnomalyEvent(
                type="hang",
                ranks=tuple(sorted(set(missing))),
                step=alive[r].step,
                time_s=now_s,
                op=op.op,
                group=op.group,
                seq=op.seq,
                evidence={
                    "waiting_ranks": [r],
                    "waited_s": round(op.age_s, 3),
                    "bound_s": round(bound_s, 3),
                    "cycle": True,
                },
                confidence=0.4,
            )
        )
    return events


def _crashes(
    heartbeats: Mapping[int, ObservedHeartbeat], cfg: DetectorConfig, now_s: float
) -> tuple[list[AnomalyEvent], set[int]]:
    events, gone = [], set()
    for r, o in sorted(heartbeats.items()):
        hb = o.heartbeat
        if hb.state == "closed":
            continue
        if o.exited or o.silent_s >= cfg.crash_silence_s:
            gone.add(r)
            events.append(
                AnomalyEvent(
                    type="crash",
                    ranks=(r,),
                    step=hb.step,
                    time_s=now_s,
                    evidence={
                        "process_exited": o.exited,
                        "heartbeat_silent_s": round(o.silent_s, 3),
                        "pid": hb.pid,
                        "host": hb.host,
                    },
                    confidence=0.95 if o.exited else 0.8,
                )
            )
    return events, gone


def detect(
    summaries: Mapping[int, Sequence[StepSummary]],
    heartbeats: Mapping[int, ObservedHeartbeat],
    *,
    world_size: int,
    now_s: float,
    config: DetectorConfig = DetectorConfig(),
) -> list[AnomalyEvent]:
    """All anomalies visible in the window. Pure: same inputs, same events.

    Args:
        summaries: per rank, its recent step summaries (any order; older ones are ignored).
        heartbeats: per rank, its latest heartbeat as observed by the collector.
        world_size: number of ranks of the job.
        now_s: the time stamped on the events.
        config: thresholds.
    """
    steps = complete_steps(summaries, world_size, config.window_steps)
    crashes, gone = _crashes(heartbeats, config, now_s)
    events = list(crashes)
    events += _hangs(heartbeats, gone, hang_bound_s(steps, config), now_s)
    links = _slow_links(steps, config, now_s)
    events += links
    explained = {r for e in links for r in e.ranks}
    events += [e for e in _slow_ranks(steps, config, now_s) if e.ranks[0] not in explained]
    return events
