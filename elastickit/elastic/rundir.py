"""The run directory's files (DESIGN.md section 6): what tools read without the job's processes.

    RUN/ckpt/          the checkpoint root (unless --ckpt says otherwise)
    RUN/events.jsonl   checkpoint records, monitor events and `recovery` events
    RUN/steps.jsonl    one line per completed step, appended by rank 0 across restarts
    RUN/nodes.json     simulated nodes: agent pid, the process group to kill, state
    RUN/local/NODE/    each simulated node's node-local checkpoint tier

The schemas are contracts (the dashboard reads them); fields may be added, never renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from elastickit.checkpoint.format.integrity import atomic_write

__all__ = [
    "NodeRecord",
    "Phases",
    "RecoveryRecord",
    "RunDir",
    "StepRecord",
    "locate",
    "mttr_lines",
    "read_nodes",
    "read_recoveries",
    "read_steps",
]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StepRecord:
    """One line of steps.jsonl."""

    step: int
    loss: float
    world_size: int
    layout: str
    grad_accum: int
    step_s: float
    time: float
    samples: tuple[int, int] = (0, 0)
    """The global sample indices [first, end) the step consumed (its data position)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NodeRecord:
    """One entry of nodes.json: `kill -9 -PGID` takes down the agent and its workers."""

    node: int
    pid: int
    pgid: int
    state: str
    """running | killed | stopped | fenced | rejoining | spare | done | failed"""
    workers: tuple[int, ...] = ()
    """Worker pids (their own sessions: torchrun starts them so; they die with the agent)."""
    local: str = ""
    """The node's node-local tier directory, relative to the run directory."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Phases:
    """MTTR by phase, seconds; they add up to the time from the failure to the first step."""

    detect_s: float
    """Failure (or the last sign of life) -> a survivor names it."""
    abort_s: float
    """Detection -> every survivor is out of its collectives and its groups are torn down."""
    rendezvous_s: float
    """-> the survivors agreed on the new membership and formed the new process group."""
    start_s: float
    """-> the model and optimizer are rebuilt on the new layout (in-process: no process start)."""
    restore_s: float
    """-> the freshest checkpoint is restored, resharded."""
    first_step_s: float
    """-> the first step on the new layout is done."""

    def total_s(self) -> float:
        return sum(dataclasses.astuple(self))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryRecord:
    """A `recovery` event of events.jsonl."""

    cause: str
    """crash | hang | killnode | stopnode | join"""
    ranks: tuple[int, ...]
    """Ranks (of the old layout) that failed; the joining ranks (new numbering) for a join."""
    node: int | None
    """The node that failed or joined."""
    phases: Phases
    restore: dict[str, Any]
    """{"tier", "step", "bytes"}"""
    lost_steps: int
    """Steps done before the failure that are trained again (after the restored step)."""
    old_layout: str
    new_layout: str
    world_size: int
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """More fields (generation, grad_accum, spares, in_process, mttr_s...)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "ranks": list(self.ranks),
            "node": self.node,
            "phases": {k: round(v, 4) for k, v in dataclasses.asdict(self.phases).items()},
            "restore": self.restore,
            "lost_steps": self.lost_steps,
            "old_layout": self.old_layout,
            "new_layout": self.new_layout,
            "world_size": self.world_size,
            **self.extra,
        }


class RunDir:
    """Paths and writers of one run directory. Appends are single `write` calls of whole lines
    (O_APPEND), so concurrent writers never interleave within a line."""

    def __init__(self, root: str, ckpt: str | None = None) -> None:
        self.root = os.path.abspath(root)
        self.ckpt = os.path.abspath(ckpt) if ckpt else os.path.join(self.root, "ckpt")
        self.events = os.path.join(self.root, "events.jsonl")
        self.steps = os.path.join(self.root, "steps.jsonl")
        self.ranks = os.path.join(self.root, "ranks.jsonl")
        self.nodes = os.path.join(self.root, "nodes.json")

    def local_tier(self, node: int | str) -> str:
        """The node-local tier directory of a simulated node."""
        return os.path.join(self.root, "local", f"node{node}")

    def make(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def _append(self, path: str, line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def append_step(self, rec: StepRecord) -> None:
        """One line in steps.jsonl (rank 0, after every completed step)."""
        self._append(self.steps, rec.to_json())

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        """One event in events.jsonl (`type`, `time`, then the fields)."""
        record = {"type": type, "time": time.time(), **fields}
        self._append(self.events, json.dumps(record, separators=(",", ":"), default=str))
        return record

    def emit_recovery(self, rec: RecoveryRecord) -> dict[str, Any]:
        return self.emit("recovery", **rec.to_dict())

    def write_nodes(self, nodes: list[NodeRecord]) -> None:
        """Replace nodes.json atomically."""
        doc = {
            "nodes": [
                {**dataclasses.asdict(n), "workers": list(n.workers)}
                for n in sorted(nodes, key=lambda n: n.node)
            ]
        }
        # Atomic for readers (the dashboard), not fsynced: a live view, rewritten at each change.
        atomic_write(self.nodes, json.dumps(doc, indent=1), fsync=False)


def _lines(path: str) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line
    except FileNotFoundError:
        pass
    return out


def read_steps(run: str, *, last_wins: bool = True) -> list[dict[str, Any]]:
    """steps.jsonl of a run; by default one record per step, the last line for it winning."""
    rows = _lines(os.path.join(run, "steps.jsonl"))
    if not last_wins:
        return rows
    by_step: dict[int, dict[str, Any]] = {}
    for r in rows:
        by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def read_recoveries(events_path: str) -> list[dict[str, Any]]:
    """The `recovery` events of an event log, oldest first."""
    return [r for r in _lines(events_path) if r.get("type") == "recovery"]


def read_nodes(run: str) -> list[dict[str, Any]]:
    """nodes.json's entries ([] when the run has none)."""
    try:
        with open(os.path.join(run, "nodes.json"), encoding="utf-8") as f:
            return list(json.load(f)["nodes"])
    except FileNotFoundError:
        return []


def _short(layout: str) -> str:
    """`pp=1,dp=3,tp=1` -> `dp=3` (axes of degree 1 left out)."""
    kept = [a for a in layout.split(",") if a and not a.endswith("=1")]
    return ",".join(kept) or "single"


def mttr_lines(recs: list[dict[str, Any]]) -> list[str]:
    """The MTTR table of `recovery` events, as text lines (header first; [] when none)."""
    if not recs:
        return []
    lines = [
        "MTTR by phase, seconds (detect, abort, rendezvous, start, restore, first step):",
        f"  {'what':13s} {'layout':12s} {'det':>5s} {'abort':>5s} {'rdzv':>5s} {'start':>5s} "
        f"{'rest':>5s} {'1st':>5s} {'total':>6s}  restored",
    ]
    keys = ("detect_s", "abort_s", "rendezvous_s", "start_s", "restore_s", "first_step_s")
    for r in recs:
        p = r["phases"]
        total = r.get("mttr_s", sum(p[k] for k in keys))
        what = f"{r['cause']} n{r.get('node')}"
        layout = f"{_short(r['old_layout'])}->{_short(r['new_layout'])}"
        restored = r.get("restore") or {}
        lines.append(
            f"  {what:13s} {layout:12s} {' '.join(f'{p[k]:5.2f}' for k in keys)} {total:6.2f}  "
            f"step {restored.get('step')} ({restored.get('tier')}), {r.get('lost_steps', 0)} redone"
        )
    return lines


def locate(path: str) -> tuple[str, str | None]:
    """(checkpoint root, event log or None) for a path given to `elastickit ls`: a run
    directory (RUN/ckpt, RUN/events.jsonl) or a checkpoint root (its own events.jsonl, or the
    run's next to it)."""
    if os.path.isdir(os.path.join(path, "ckpt")) and os.path.exists(os.path.join(path, "steps.jsonl")):
        events = os.path.join(path, "events.jsonl")
        return os.path.join(path, "ckpt"), events if os.path.exists(events) else None
    for events in (os.path.join(path, "events.jsonl"), os.path.join(os.path.dirname(os.path.abspath(path)), "events.jsonl")):
        if os.path.exists(events):
            return path, events
    return path, None
