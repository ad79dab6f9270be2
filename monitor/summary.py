"""Compact, JSON-able per-step summaries and heartbeats: what each rank ships to the collector.

A `StepSummary` folds one step's records into per-group and per-peer totals (a few hundred
bytes however many collectives the step issued). A `Heartbeat` says the rank is alive and
which operations it is inside right now: the collector's hang and crash evidence.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .records import CollectiveRecord


def _req(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ValueError(f"{where}: field {key!r} is missing")
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GroupStat:
    """One step's collectives on one process group, as one rank saw them."""

    group: str
    ranks: tuple[int, ...]
    num_ops: int
    wait_s: float
    num_bytes: int
    last_seq: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "ranks": list(self.ranks),
            "num_ops": self.num_ops,
            "wait_s": self.wait_s,
            "num_bytes": self.num_bytes,
            "last_seq": self.last_seq,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GroupStat:
        w = "GroupStat"
        return cls(
            group=_req(d, "group", str, w),
            ranks=tuple(_req(d, "ranks", list, w)),
            num_ops=_req(d, "num_ops", int, w),
            wait_s=_req(d, "wait_s", float, w),
            num_bytes=_req(d, "num_bytes", int, w),
            last_seq=_req(d, "last_seq", int, w),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PeerStat:
    """One step's point-to-point operations between this rank and `peer` (both directions)."""

    peer: int
    num_ops: int
    wait_s: float
    num_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "num_ops": self.num_ops,
            "wait_s": self.wait_s,
            "num_bytes": self.num_bytes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PeerStat:
        w = "PeerStat"
        return cls(
            peer=_req(d, "peer", int, w),
            num_ops=_req(d, "num_ops", int, w),
            wait_s=_req(d, "wait_s", float, w),
            num_bytes=_req(d, "num_bytes", int, w),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StepSummary:
    """What one rank did in one step.

    Attributes:
        rank: global rank.
        step: training step (as the job counts it).
        time_s: the rank's wall clock at the end of the step.
        step_time_s: duration of the step on this rank.
        wait_s: total time spent inside operations (exit - enter, summed over collectives and
            p2p: in a pipeline or ring, the waiting for a slow rank happens in the receives).
        num_ops: operations completed during the step (collectives and p2p).
        num_errors: operations that completed with an error.
        groups: per process group totals of collectives.
        peers: per peer totals of point-to-point operations.
    """

    rank: int
    step: int
    time_s: float
    step_time_s: float
    wait_s: float
    num_ops: int
    num_errors: int = 0
    groups: tuple[GroupStat, ...] = ()
    peers: tuple[PeerStat, ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"StepSummary: field 'rank' must be >= 0, got {self.rank}")
        if self.step_time_s < 0:
            raise ValueError(
                f"StepSummary: field 'step_time_s' must be >= 0, got {self.step_time_s}"
            )

    def to_json(self) -> str:
        return json.dumps(
            {
                "rank": self.rank,
                "step": self.step,
                "time_s": self.time_s,
                "step_time_s": self.step_time_s,
                "wait_s": self.wait_s,
                "num_ops": self.num_ops,
                "num_errors": self.num_errors,
                "groups": [g.to_dict() for g in self.groups],
                "peers": [p.to_dict() for p in self.peers],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> StepSummary:
        d = json.loads(text)
        w = "StepSummary"
        if not isinstance(d, dict):
            raise ValueError(f"{w}: expected a JSON object")
        return cls(
            rank=_req(d, "rank", int, w),
            step=_req(d, "step", int, w),
            time_s=_req(d, "time_s", float, w),
            step_time_s=_req(d, "step_time_s", float, w),
            wait_s=_req(d, "wait_s", float, w),
            num_ops=_req(d, "num_ops", int, w),
            num_errors=_req(d, "num_errors", int, w),
            groups=tuple(GroupStat.from_dict(g) for g in _req(d, "groups", list, w)),
            peers=tuple(PeerStat.from_dict(p) for p in _req(d, "peers", list, w)),
        )

    def group(self, name: str) -> GroupStat | None:
        for g in self.groups:
            if g.group == name:
                return g
        return None


def summarize(
    records: Iterable[CollectiveRecord], *, rank: int, step: int, time_s: float, step_time_s: float
) -> StepSummary:
    """Fold one step's completed records into a `StepSummary`."""
    groups: dict[str, list[Any]] = {}
    peers: dict[int, list[Any]] = {}
    wait = 0.0
    num_ops = 0
    errors = 0
    for r in records:
        num_ops += 1
        errors += not r.ok
        wait += r.wait_s
        if r.is_p2p:
            p = peers.setdefault(r.peer, [0, 0.0, 0])
            p[0] += 1
            p[1] += r.wait_s
            p[2] += r.num_bytes
            continue
        g = groups.setdefault(r.group, [r.group_ranks, 0, 0.0, 0, 0])
        g[1] += 1
        g[2] += r.wait_s
        g[3] += r.num_bytes
        g[4] = max(g[4], r.seq)
    return StepSummary(
        rank=rank,
        step=step,
        time_s=time_s,
        step_time_s=step_time_s,
        wait_s=wait,
        num_ops=num_ops,
        num_errors=errors,
        groups=tuple(
            GroupStat(
                group=k, ranks=tuple(v[0]), num_ops=v[1], wait_s=v[2], num_bytes=v[3], last_seq=v[4]
            )
            for k, v in sorted(groups.items())
        ),
        peers=tuple(
            PeerStat(peer=k, num_ops=v[0], wait_s=v[1], num_bytes=v[2])
            for k, v in sorted(peers.items())
        ),
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InFlightOp:
    """An operation a rank is inside right now; `age_s` by the rank's own clock."""

    op: str
    group: str
    ranks: tuple[int, ...]
    peer: int
    seq: int
    age_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "group": self.group,
            "ranks": list(self.ranks),
            "peer": self.peer,
            "seq": self.seq,
            "age_s": self.age_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InFlightOp:
        w = "InFlightOp"
        return cls(
            op=_req(d, "op", str, w),
            group=_req(d, "group", str, w),
            ranks=tuple(_req(d, "ranks", list, w)),
            peer=_req(d, "peer", int, w),
            seq=_req(d, "seq", int, w),
            age_s=_req(d, "age_s", float, w),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """A rank's sign of life, sent every heartbeat interval by a background thread.

    Attributes:
        rank, pid, host: who sends it.
        beat: increases by one per heartbeat (the collector notices when it stops changing).
        time_s: the rank's wall clock when sent.
        step: the last step the rank started (-1 before the first).
        state: "running", or "closed" after a clean shutdown (not a crash).
        in_flight: operations entered and not completed.
        entered: last collective seq entered per group.
        entered_p2p: last p2p seq entered per (group, op, peer).
    """

    rank: int
    pid: int
    host: str
    beat: int
    time_s: float
    step: int
    state: str = "running"
    in_flight: tuple[InFlightOp, ...] = ()
    entered: tuple[tuple[str, int], ...] = ()
    entered_p2p: tuple[tuple[str, str, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.state not in ("running", "closed"):
            raise ValueError(
                f"Heartbeat: field 'state' must be running or closed, got {self.state!r}"
            )

    def to_json(self) -> str:
        return json.dumps(
            {
                "rank": self.rank,
                "pid": self.pid,
                "host": self.host,
                "beat": self.beat,
                "time_s": self.time_s,
                "step": self.step,
                "state": self.state,
                "in_flight": [o.to_dict() for o in self.in_flight],
                "entered": [list(e) for e in self.entered],
                "entered_p2p": [list(e) for e in self.entered_p2p],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Heartbeat:
        d = json.loads(text)
        w = "Heartbeat"
        if not isinstance(d, dict):
            raise ValueError(f"{w}: expected a JSON object")
        return cls(
            rank=_req(d, "rank", int, w),
            pid=_req(d, "pid", int, w),
            host=_req(d, "host", str, w),
            beat=_req(d, "beat", int, w),
            time_s=_req(d, "time_s", float, w),
            step=_req(d, "step", int, w),
            state=_req(d, "state", str, w),
            in_flight=tuple(InFlightOp.from_dict(o) for o in _req(d, "in_flight", list, w)),
            entered=tuple((str(g), int(s)) for g, s in _req(d, "entered", list, w)),
            entered_p2p=tuple(
                (str(g), str(o), int(p), int(s)) for g, o, p, s in _req(d, "entered_p2p", list, w)
            ),
        )

    def entered_seq(self, group: str) -> int:
        for g, s in self.entered:
            if g == group:
                return s
        return 0

    def entered_p2p_seq(self, group: str, op: str, peer: int) -> int:
        for g, o, p, s in self.entered_p2p:
            if g == group and o == op and p == peer:
                return s
        return 0
