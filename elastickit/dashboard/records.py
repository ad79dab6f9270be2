"""Typed views of the records the panels read from a run's event log (DESIGN.md section 6).

The event log mixes monitor findings (`slow_rank`, `slow_link`, `hang`, `crash`), checkpoint
records (`checkpoint`, `checkpoint_skipped`), restores (`restore`, `restore_fallback`) and
recoveries (`recovery`). Each parser takes one record and returns a frozen view or raises
ValueError naming the field; `parse_all` keeps the good ones and counts the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

PHASES = ("detect_s", "abort_s", "rendezvous_s", "start_s", "restore_s", "first_step_s")
FAILURE_TYPES = ("crash", "hang")
DEGRADATION_TYPES = ("slow_rank", "slow_link")

T = TypeVar("T")


def _num(d: Mapping[str, Any], key: str, where: str, default: float | None = None) -> float:
    v = d.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}: field {key!r} must be a number, got {v!r}")
    return float(v)


def _int(d: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    v = d.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: field {key!r} must be an integer, got {v!r}")
    return v


def _ranks(d: Mapping[str, Any], where: str) -> tuple[int, ...]:
    v = d.get("ranks", [])
    if not isinstance(v, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in v):
        raise ValueError(f"{where}: field 'ranks' must be a list of integers, got {v!r}")
    return tuple(v)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovery:
    """A `recovery` event: what failed, what each phase of getting back cost, what it restored."""

    time: float
    cause: str
    ranks: tuple[int, ...]
    node: int | None
    phases: tuple[tuple[str, float], ...]
    restore_tier: str
    restore_step: int | None
    restore_bytes: int
    lost_steps: int
    old_layout: str
    new_layout: str
    world_size: int | None

    @property
    def is_failure(self) -> bool:
        """A join grows the job; everything else followed a failure."""
        return self.cause != "join"

    @property
    def downtime_s(self) -> float:
        """Seconds from the failure to the first step after it (the sum of the phases)."""
        return sum(s for _, s in self.phases)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recovery:
        w = "recovery event"
        phases_in = d.get("phases", {})
        if not isinstance(phases_in, dict):
            raise ValueError(f"{w}: field 'phases' must be an object")
        phases = tuple((p, _num(phases_in, p, w, 0.0)) for p in PHASES)
        restore = d.get("restore") or {}
        if not isinstance(restore, dict):
            raise ValueError(f"{w}: field 'restore' must be an object")
        node = d.get("node")
        return cls(
            time=_num(d, "time", w),
            cause=str(d.get("cause", "")),
            ranks=_ranks(d, w),
            node=node if isinstance(node, int) and not isinstance(node, bool) else None,
            phases=phases,
            restore_tier=str(restore.get("tier", "")),
            restore_step=restore.get("step") if isinstance(restore.get("step"), int) else None,
            restore_bytes=_int(restore, "bytes", w, 0),
            lost_steps=_int(d, "lost_steps", w, 0),
            old_layout=str(d.get("old_layout", "")),
            new_layout=str(d.get("new_layout", "")),
            world_size=d.get("world_size") if isinstance(d.get("world_size"), int) else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TierResult:
    """One tier's outcome for one checkpoint (the `tiers` map of a `checkpoint` record)."""

    tier: str
    status: str
    stored_bytes: int | None = None
    persist_s: float | None = None
    compression_ratio: float | None = None
    peer_bytes: int | None = None
    peer_s: float | None = None

    @property
    def committed(self) -> bool:
        return self.status == "committed"

    @property
    def superseded(self) -> bool:
        return self.status.startswith("superseded")

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointRecord:
    """A `checkpoint` record: one save and where it went."""

    time: float
    step: int
    blocking_s: float
    snapshot_bytes: int
    tiers: tuple[TierResult, ...]

    def tier(self, name: str) -> TierResult | None:
        return next((t for t in self.tiers if t.tier == name), None)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointRecord:
        w = "checkpoint record"
        tiers_in = d.get("tiers", {})
        if not isinstance(tiers_in, dict):
            raise ValueError(f"{w}: field 'tiers' must be an object")
        tiers = []
        for name, t in sorted(tiers_in.items()):
            if not isinstance(t, dict):
                raise ValueError(f"{w}: tier {name!r} must be an object")
            tiers.append(
                TierResult(
                    tier=str(name),
                    status=str(t.get("status", "")),
                    stored_bytes=_opt(t, "stored_bytes", int),
                    persist_s=_opt(t, "persist_s", float),
                    compression_ratio=_opt(t, "compression_ratio", float),
                    peer_bytes=_opt(t, "peer_bytes", int),
                    peer_s=_opt(t, "peer_s", float),
                )
            )
        return cls(
            time=_num(d, "time", w),
            step=_int(d, "step", w),
            blocking_s=_num(d, "blocking_s", w, 0.0),
            snapshot_bytes=_int(d, "bytes", w, 0),
            tiers=tuple(tiers),
        )


def _opt(d: Mapping[str, Any], key: str, kind: type) -> Any:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return kind(v)


def parse_all(
    records: Iterable[Mapping[str, Any]], kind: str, parse: Callable[[Mapping[str, Any]], T]
) -> tuple[list[T], int]:
    """The records of type `kind` parsed; (good ones, number rejected)."""
    good, bad = [], 0
    for r in records:
        if r.get("type") != kind:
            continue
        try:
            good.append(parse(r))
        except ValueError:
            bad += 1
    return good, bad


def of_type(events: Iterable[Mapping[str, Any]], *types: str) -> list[Mapping[str, Any]]:
    """The events whose `type` is one of `types` (in log order)."""
    return [e for e in events if e.get("type") in types]


def final_steps(steps: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """steps.jsonl's final trajectory: the last line for each step wins (a replayed step
    appears again after a restore)."""
    out: dict[int, Mapping[str, Any]] = {}
    for line in steps:
        out[line["step"]] = line
    return out


def number(d: Mapping[str, Any], key: str) -> float | None:
    """`d[key]` as a float when it is a number (not a bool), else None."""
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def current_step(steps: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]] = (),
                 summaries: Sequence[Any] = ()) -> int | None:
    """The newest step the job completed: steps.jsonl's last line, else the highest step in
    the per-rank summaries or the checkpoint records."""
    if steps:
        return int(steps[-1]["step"])
    seen = [s.step for s in summaries]
    seen += [e["step"] for e in events if e.get("type") == "checkpoint" and isinstance(e.get("step"), int)]
    return max(seen) if seen else None
