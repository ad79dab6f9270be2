"""Fault injection for tests, benchmarks and the demo (`elastickit train --inject FAULT`).

    slow:rank=R:ms=M[:step=S]              rank R sleeps M ms at the start of every step (from S)
    slowlink:src=A:dst=B:ms=M[:step=S]     sends A->B, and collectives of groups holding A and B,
                                           take M ms longer (inside the probing backend)
    hang:rank=R:step=S                     rank R stops entering collectives at step S
    crash:rank=R:step=S                    rank R's process exits (os._exit) at step S

`build_step_hooks` turns the flags into step hooks (plus the monitor's hook when an events
file is given); the trainer calls `on_step_start(step)`, `on_step_end(step, loss,
step_time_s)` and, at the end, `close()` on each, in order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from elastickit.checkpoint.errors import RequestError
from elastickit.trainer.hooks import StepHook

CRASH_EXIT_CODE = 13
_KINDS = {
    "slow": ({"rank", "ms"}, {"step"}),
    "slowlink": ({"src", "dst", "ms"}, {"step"}),
    "hang": ({"rank", "step"}, set()),
    "crash": ({"rank", "step"}, set()),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FaultSpec:
    """One parsed `--inject` value. Unused fields are -1."""

    kind: str
    rank: int = -1
    src: int = -1
    dst: int = -1
    ms: float = 0.0
    step: int = -1
    text: str = ""


def parse_fault(text: str, world_size: int) -> FaultSpec:
    """Parse one `--inject` value; raise RequestError naming the flag and the fix."""
    usage = (
        "use slow:rank=R:ms=M, slowlink:src=A:dst=B:ms=M, hang:rank=R:step=S or crash:rank=R:step=S"
    )
    kind, _, rest = text.strip().partition(":")
    if kind not in _KINDS:
        raise RequestError(f"--inject {text!r}: unknown fault {kind!r}; {usage}.")
    required, optional = _KINDS[kind]
    fields: dict[str, str] = {}
    for part in filter(None, rest.split(":")):
        key, eq, value = part.partition("=")
        if not eq or key not in required | optional:
            raise RequestError(f"--inject {text!r}: unexpected field {part!r}; {usage}.")
        if key in fields:
            raise RequestError(f"--inject {text!r}: field {key!r} is given twice; give it once.")
        fields[key] = value
    missing = sorted(required - fields.keys())
    if missing:
        raise RequestError(f"--inject {text!r}: field {missing[0]!r} is missing; {usage}.")
    values: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            values[key] = float(value) if key == "ms" else int(value)
        except ValueError:
            raise RequestError(
                f"--inject {text!r}: {key}={value!r} is not a number; "
                f"give a {'number of milliseconds' if key == 'ms' else 'whole number'}."
            ) from None
    for key in ("rank", "src", "dst"):
        if key in values and not 0 <= values[key] < world_size:
            raise RequestError(
                f"--inject {text!r}: {key}={values[key]} is outside the world of "
                f"{world_size} rank{'' if world_size == 1 else 's'}; use 0..{world_size - 1}."
            )
    if "ms" in values and values["ms"] <= 0:
        raise RequestError(f"--inject {text!r}: ms must be positive; give the delay in ms.")
    if values.get("step", 0) < 0:
        raise RequestError(f"--inject {text!r}: step must be >= 0.")
    if kind == "slowlink" and values["src"] == values["dst"]:
        raise RequestError(
            f"--inject {text!r}: src and dst are the same rank; a link joins two ranks."
        )
    if kind in ("slow", "slowlink"):
        values.setdefault("step", 0)
    return FaultSpec(kind=kind, text=text, **values)


class _NoOp:
    def on_step_start(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, loss: float, step_time_s: float) -> None:
        pass

    def close(self) -> None:
        pass


class SlowRank(_NoOp):
    """Sleep `ms` at the start of every step from `step` on: a straggler."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec

    def on_step_start(self, step: int) -> None:
        if step >= self.spec.step:
            time.sleep(self.spec.ms / 1000.0)


class Hang(_NoOp):
    """From `step` on, this rank never returns from the step start: it stops entering
    collectives while its process (and the monitor's heartbeat) stays alive."""

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec

    def on_step_start(self, step: int) -> None:
        if step >= self.spec.step:
            print(
                f"elastickit.faults: {self.spec.text}: hanging at step {step}",
                file=sys.stderr,
                flush=True,
            )
            while True:
                time.sleep(1.0)


class Crash(_NoOp):
    """At `step`, exit the process at once (no cleanup, like a killed node).

    With the monitor's hook given, its heartbeat is sent first: the monitor ships heartbeats
    every 0.2 s, so the last one would otherwise often name the step before, and the crash
    event would not say the step this hook announces.
    """

    def __init__(self, spec: FaultSpec, monitor: MonitorHook | None = None) -> None:
        self.spec = spec
        self.monitor = monitor

    def on_step_start(self, step: int) -> None:
        if step >= self.spec.step:
            print(
                f"elastickit.faults: {self.spec.text}: crashing at step {step}",
                file=sys.stderr,
                flush=True,
            )
            if self.monitor is not None:
                self.monitor.beat()
            os._exit(CRASH_EXIT_CODE)


class SlowLink(_NoOp):
    """Delay traffic between src and dst inside the probing backend (an OpInterceptor).

    A send from src to dst sleeps `ms` before it is issued (on src; dst's receive waits as
    long). A collective of a group holding both src and dst completes `ms` later on every
    member, as a slow link in a ring would make it. Requires the probing backend. Several
    slow links may be active at once.
    """

    def __init__(self, spec: FaultSpec, rank: int) -> None:
        self.spec = spec
        self.rank = rank
        self.active = spec.step <= 0
        _LINKS.append(self)
        _install_links()

    def on_step_start(self, step: int) -> None:
        self.active = step >= self.spec.step

    def before_issue(self, op: str, group_ranks: tuple[int, ...], peer: int) -> None:
        if self.active and op == "send" and self.rank == self.spec.src and peer == self.spec.dst:
            time.sleep(self.spec.ms / 1000.0)

    def after_issue(self, op: str, group_ranks: tuple[int, ...], peer: int, work: Any) -> None:
        if (
            self.active
            and peer == -1
            and self.spec.src in group_ranks
            and self.spec.dst in group_ranks
            and op != "barrier"
        ):
            work.wait()
            time.sleep(self.spec.ms / 1000.0)

    def close(self) -> None:
        if self in _LINKS:
            _LINKS.remove(self)
        _install_links()


_LINKS: list[SlowLink] = []


class _AllLinks:
    """The one interceptor the probe holds: every active SlowLink in turn."""

    def before_issue(self, op: str, group_ranks: tuple[int, ...], peer: int) -> None:
        for link in _LINKS:
            link.before_issue(op, group_ranks, peer)

    def after_issue(self, op: str, group_ranks: tuple[int, ...], peer: int, work: Any) -> None:
        for link in _LINKS:
            link.after_issue(op, group_ranks, peer, work)


def _install_links() -> None:
    from elastickit.monitor import set_interceptor

    set_interceptor(_AllLinks() if _LINKS else None)


class MonitorHook(_NoOp):
    """The monitor as a step hook: reporter on every rank, collector on rank 0. It attaches
    at the first step (the process group must be up by then). Findings go to `events_path`;
    every rank's step summaries to `ranks.jsonl` beside it (the run directory's per-rank log,
    which `elastickit dashboard` draws its heatmap and link matrix from)."""

    def __init__(self, events_path: str, *, abort_on_hang: bool, metrics_port: int | None) -> None:
        self.events_path = events_path
        self.abort_on_hang = abort_on_hang
        self.metrics_port = metrics_port
        self.monitor: Any = None

    def _ensure(self) -> Any:
        if self.monitor is None:
            from elastickit.monitor import attach

            self.monitor = attach(
                events_path=self.events_path,
                ranks_path=os.path.join(
                    os.path.dirname(os.path.abspath(self.events_path)), "ranks.jsonl"
                ),
                abort_on_hang=self.abort_on_hang,
                metrics_port=self.metrics_port,
            )
            if self.monitor.metrics_port is not None:
                print(
                    f"elastickit.monitor: metrics on http://127.0.0.1:{self.monitor.metrics_port}/",
                    file=sys.stderr,
                    flush=True,
                )
        return self.monitor

    def on_step_start(self, step: int) -> None:
        self._ensure().on_step_start(step)

    def on_step_end(self, step: int, loss: float, step_time_s: float) -> None:
        self._ensure().on_step_end(step, loss, step_time_s)

    def beat(self) -> None:
        """Send this rank's heartbeat (its current step) now."""
        if self.monitor is not None:
            self.monitor.reporter.beat()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def build_step_hooks(
    specs: list[str],
    events_path: str | None,
    rank: int,
    world_size: int,
    *,
    abort_on_hang: bool | None = None,
    metrics_port: int | None = None,
) -> list[StepHook]:
    """The step hooks for `--inject` specs (all validated first) and, when `events_path` is
    set, the monitor's hook (first in the list; collector on rank 0, events to events_path).

    Args:
        abort_on_hang: abort the job when the monitor finds a hang, so torchrun restarts at
            once. None: on exactly when a hang is injected (else the injected hang would last
            until the collective timeout).
        metrics_port: Prometheus port on 127.0.0.1 for the collector (0: any; None: off).

    Raises RequestError naming the bad `--inject` value.
    """
    parsed = [parse_fault(s, world_size) for s in specs]
    if abort_on_hang is None:
        abort_on_hang = any(p.kind == "hang" for p in parsed)
    hooks: list[StepHook] = []
    monitor = None
    if events_path:
        monitor = MonitorHook(events_path, abort_on_hang=abort_on_hang, metrics_port=metrics_port)
        hooks.append(monitor)
    for spec in parsed:
        if spec.kind == "slowlink":  # on every rank: all members of a shared group delay
            hooks.append(SlowLink(spec, rank))
        elif spec.rank != rank:
            continue
        elif spec.kind == "slow":
            hooks.append(SlowRank(spec))
        elif spec.kind == "hang":
            hooks.append(Hang(spec))
        elif spec.kind == "crash":
            hooks.append(Crash(spec, monitor))
    return hooks
