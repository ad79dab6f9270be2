"""Reading a run directory's logs (DESIGN.md section 6) incrementally, as they grow.

    sources = RunSources.from_run_dir("runs/exp1")
    reader = RunReader(sources)
    logs = reader.read()      # a RunLogs snapshot; later calls read only what was appended

The files are JSON lines appended by the job while the dashboard reads them: a last line still
being written is left for the next read, a line that is not JSON is skipped and counted (the
job panel says how many), and a file that shrank (rotated or rewritten) is read again from the
start. Nothing here interprets the records; the panels do.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from elastickit.monitor.summary import StepSummary

# Never hold more than this many records per file in memory: a run of a million steps keeps the
# newest ones (the panels look at recent windows; ETTR and curves say when they were truncated).
MAX_RECORDS = 200_000


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSources:
    """Where a run's logs are. Paths are strings; any may be absent on disk (not yet written).

    Attributes:
        events: event logs merged by time (monitor findings, checkpoint and restore records,
            recoveries); a run directory has `events.jsonl`, plus `ckpt/events.jsonl` when the
            checkpoint root keeps its own log (the Checkpointer's default).
        steps: `steps.jsonl` (one line per completed step, rank 0).
        ranks: `ranks.jsonl` (every rank's step summary, written by the monitor's collector
            beside its events file: `RUN/ranks.jsonl`, or `ckpt/ranks.jsonl` when only that
            exists, as after `elastickit train --inject ...` without `--events`).
        nodes: `nodes.json` (the simulated nodes of `elastickit train --nodes`).
        ckpt_root: the persistent tier's root (committed `step-*` directories).
        local: node-local tier directories by node, when known (`nodes.json` "local" fields or
            `--local PATTERN`); relative paths are relative to the run directory.
        label: what the page's title says.
    """

    events: tuple[str, ...] = ()
    steps: str = ""
    ranks: str = ""
    nodes: str = ""
    ckpt_root: str = ""
    local: tuple[tuple[int, str], ...] = ()
    label: str = ""

    @classmethod
    def from_run_dir(cls, run: str, *, ckpt: str = "", local_pattern: str = "") -> RunSources:
        """The sources of run directory `run`; `ckpt` overrides `RUN/ckpt`; `local_pattern`
        (with `{node}`) names node-local tier directories that nodes.json does not."""
        ckpt = ckpt or os.path.join(run, "ckpt")
        events = [os.path.join(run, "events.jsonl")]
        own = os.path.join(ckpt, "events.jsonl")
        if os.path.realpath(own) != os.path.realpath(events[0]):
            events.append(own)
        ranks = os.path.join(run, "ranks.jsonl")
        beside_ckpt = os.path.join(ckpt, "ranks.jsonl")
        if not os.path.exists(ranks) and os.path.exists(beside_ckpt):
            ranks = beside_ckpt  # the monitor wrote its events (and so this) into the ckpt root
        local: tuple[tuple[int, str], ...] = ()
        if local_pattern:
            local = tuple((n, local_pattern.format(node=n)) for n in range(_num_nodes(run, local_pattern)))
        return cls(
            events=tuple(events),
            steps=os.path.join(run, "steps.jsonl"),
            ranks=ranks,
            nodes=os.path.join(run, "nodes.json"),
            ckpt_root=ckpt,
            local=local,
            label=os.path.abspath(run),
        )

    @classmethod
    def from_events_file(cls, path: str) -> RunSources:
        """One event log alone (`elastickit dashboard --events FILE`), with the per-rank log
        the monitor writes beside it (`ranks.jsonl`) when there is one."""
        return cls(
            events=(path,),
            ranks=os.path.join(os.path.dirname(os.path.abspath(path)), "ranks.jsonl"),
            label=os.path.abspath(path),
        )


def _num_nodes(run: str, pattern: str) -> int:
    """Nodes named by nodes.json, else as many `{node}` directories as exist from 0 on."""
    doc = _read_json(os.path.join(run, "nodes.json"))
    if isinstance(doc, dict) and isinstance(doc.get("nodes"), list):
        return len(doc["nodes"])
    n = 0
    while os.path.isdir(pattern.format(node=n)):
        n += 1
    return n


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class JsonlTail:
    """Follows one JSON-lines file: each `read()` parses only the complete lines appended
    since the last one. `records` are the parsed objects (dicts only), oldest first;
    `appended` those the last `read()` added; `generation` counts restarts from the top."""

    def __init__(self, path: str, *, max_records: int = MAX_RECORDS) -> None:
        self.path = path
        self.max_records = max_records
        self.records: list[dict[str, Any]] = []
        self.bad_lines = 0
        self.dropped = 0  # oldest records let go past max_records
        self.appended: list[dict[str, Any]] = []
        self.generation = 0
        self._offset = 0
        self._ident: tuple[int, int] | None = None

    def read(self) -> bool:
        """Read what was appended; True when anything changed."""
        self.appended = []
        try:
            st = os.stat(self.path)
        except OSError:
            if self._offset or self.records:
                self._reset()
                return True
            return False
        ident = (st.st_dev, st.st_ino)
        changed = False
        if ident != self._ident or st.st_size < self._offset:
            changed = bool(self._offset or self.records)
            self._reset()
            self._ident = ident
        if st.st_size == self._offset:
            return changed
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return changed  # a line still being written
        self._offset += end + 1
        for line in chunk[: end + 1].splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(obj, dict):
                self.appended.append(obj)
            else:
                self.bad_lines += 1
        self.records.extend(self.appended)
        if len(self.records) > self.max_records:
            extra = len(self.records) - self.max_records
            del self.records[:extra]
            self.dropped += extra
        return True

    def _reset(self) -> None:
        self.generation += 1
        self.records = []
        self.bad_lines = 0
        self.dropped = 0
        self._offset = 0
        self._ident = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunLogs:
    """One consistent snapshot of a run's logs: what every panel function takes.

    Attributes:
        events: every record of the event logs, sorted by `time` (records without a numeric
            `time` are skipped and counted in `bad_lines`).
        steps: steps.jsonl lines in file order (a replayed step appears again).
        summaries: ranks.jsonl step summaries in file order (validated `StepSummary`s).
        nodes: nodes.json's node entries (an empty tuple without nodes.json).
        sources: where they came from.
        bad_lines: per file name, lines skipped because they were not a valid record.
        dropped: per file name, oldest records let go to bound memory.
        version: changes whenever any input changes (for caching and HTTP ETags).
    """

    events: tuple[dict[str, Any], ...] = ()
    steps: tuple[dict[str, Any], ...] = ()
    summaries: tuple[StepSummary, ...] = ()
    nodes: tuple[dict[str, Any], ...] = ()
    sources: RunSources = field(default_factory=RunSources)
    bad_lines: tuple[tuple[str, int], ...] = ()
    dropped: tuple[tuple[str, int], ...] = ()
    version: int = 0


class RunReader:
    """Keeps a `JsonlTail` per log and hands out `RunLogs` snapshots; thread-safe."""

    def __init__(self, sources: RunSources) -> None:
        self.sources = sources
        self._events = [JsonlTail(p) for p in sources.events]
        self._steps = JsonlTail(sources.steps) if sources.steps else None
        self._ranks = JsonlTail(sources.ranks) if sources.ranks else None
        self._lock = threading.Lock()
        self._version = 0
        self._nodes_stat: tuple[float, int] | None = None
        self._nodes: tuple[dict[str, Any], ...] = ()
        self._snapshot: RunLogs | None = None
        self._summaries: list[StepSummary] = []
        self._bad_summaries = 0
        self._ranks_generation = 0

    def read(self) -> RunLogs:
        """Read what was appended since the last call; the current snapshot."""
        with self._lock:
            changed = False
            for tail in self._events:
                changed |= tail.read()
            if self._steps is not None:
                changed |= self._steps.read()
            if self._ranks is not None and self._ranks.read():
                changed = True
                self._parse_summaries(self._ranks)
            changed |= self._read_nodes()
            if changed or self._snapshot is None:
                self._version += 1
                self._snapshot = self._build()
            return self._snapshot

    def _parse_summaries(self, tail: JsonlTail) -> None:
        if tail.generation != self._ranks_generation:  # the file was replaced: start over
            self._ranks_generation = tail.generation
            self._summaries, self._bad_summaries = [], 0
        for record in tail.appended:
            try:
                self._summaries.append(StepSummary.from_json(json.dumps(record)))
            except ValueError:
                self._bad_summaries += 1
        if len(self._summaries) > MAX_RECORDS:
            del self._summaries[: len(self._summaries) - MAX_RECORDS]

    def _read_nodes(self) -> bool:
        path = self.sources.nodes
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        key = (st.st_mtime, st.st_size) if st is not None else None
        if key == self._nodes_stat:
            return False
        self._nodes_stat = key
        doc = _read_json(path) if st is not None else None
        nodes = doc.get("nodes") if isinstance(doc, dict) else None
        self._nodes = tuple(n for n in nodes if isinstance(n, dict)) if isinstance(nodes, list) else ()
        return True

    def _build(self) -> RunLogs:
        events: list[dict[str, Any]] = []
        bad: dict[str, int] = {}
        dropped: dict[str, int] = {}
        for tail in self._events:
            name = os.path.basename(tail.path)
            bad[name] = bad.get(name, 0) + tail.bad_lines
            dropped[name] = dropped.get(name, 0) + tail.dropped
            for r in tail.records:
                if isinstance(r.get("time"), (int, float)) and not isinstance(r.get("time"), bool):
                    events.append(r)
                else:
                    bad[name] += 1
        events.sort(key=lambda r: r["time"])
        steps: list[dict[str, Any]] = []
        if self._steps is not None:
            good = [r for r in self._steps.records if _is_step_line(r)]
            bad["steps.jsonl"] = self._steps.bad_lines + len(self._steps.records) - len(good)
            dropped["steps.jsonl"] = self._steps.dropped
            steps = good
        if self._ranks is not None:
            bad["ranks.jsonl"] = self._ranks.bad_lines + self._bad_summaries
            dropped["ranks.jsonl"] = self._ranks.dropped
        return RunLogs(
            events=tuple(events),
            steps=tuple(steps),
            summaries=tuple(self._summaries),
            nodes=self._nodes,
            sources=self.sources,
            bad_lines=tuple(sorted((k, v) for k, v in bad.items() if v)),
            dropped=tuple(sorted((k, v) for k, v in dropped.items() if v)),
            version=self._version,
        )


def _is_step_line(r: dict[str, Any]) -> bool:
    """A steps.jsonl line needs an integer step and a numeric time; the rest is optional."""
    step, t = r.get("step"), r.get("time")
    return (
        isinstance(step, int)
        and not isinstance(step, bool)
        and isinstance(t, (int, float))
        and not isinstance(t, bool)
    )


def load_run(sources: RunSources) -> RunLogs:
    """Read every log of `sources` once (tests, `elastickit top --once`)."""
    return RunReader(sources).read()
