"""One call to monitor any torch.distributed job.

    import elastickit.monitor as ekm
    dist.init_process_group(ekm.register_backend())        # probes on every group
    with ekm.attach(events_path="events.jsonl") as mon:    # reporter everywhere, collector on 0
        for step in range(n):
            with mon.step(step):
                ...forward, backward, optimizer.step()...

or `ekm.attach(optimizer=opt)` to count steps from the optimizer's step hook instead.
The Monitor also offers the trainer's step-hook methods (`on_step_start`, `on_step_end`,
`close`), so it can be passed wherever a step hook is expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .collector import Collector
from .detector import AnomalyEvent, DetectorConfig
from .probe import PROBE
from .shipping import Reporter, StoreLike


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MonitorOptions:
    """How the monitor runs.

    Attributes:
        events_path: JSON-lines file the collector appends findings to (None: keep in memory).
        ranks_path: JSON-lines file the collector appends every rank's step summary to
            (the dashboard's heatmap and links; None: not recorded).
        ranks_tags: extra JSON fields for each rank's lines in `ranks_path` (rank -> fields;
            an elastic job states the generation and the worker holding each rank).
        collector_rank: the rank that runs the collector thread (None: no collector here,
            e.g. the launcher runs one).
        metrics_port: Prometheus port on 127.0.0.1 (0: any free port; None: no metrics).
        abort_on_hang: on a hang, record the culprit and abort the whole job at once.
        heartbeat_s: heartbeat and shipping interval of every rank.
        poll_s: the collector's polling interval.
        prefix: store key prefix.
        config: detector thresholds.
    """

    events_path: str | None = None
    ranks_path: str | None = None
    ranks_tags: Mapping[int, Mapping[str, Any]] | None = None
    collector_rank: int | None = 0
    metrics_port: int | None = None
    abort_on_hang: bool = False
    heartbeat_s: float = 0.2
    poll_s: float = 0.1
    prefix: str = "ekmon"
    config: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0 or self.poll_s <= 0:
            raise ValueError("MonitorOptions: fields 'heartbeat_s' and 'poll_s' must be > 0")


class Monitor:
    """The monitor of one rank: a reporter, and on the collector rank a collector."""

    def __init__(
        self,
        store: StoreLike,
        *,
        rank: int,
        world_size: int,
        options: MonitorOptions = MonitorOptions(),
        on_event: Callable[[AnomalyEvent], None] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.options = options
        self.reporter = Reporter(
            store,
            rank=rank,
            buffer=PROBE.buffer,
            prefix=options.prefix,
            interval_s=options.heartbeat_s,
        )
        self.collector: Collector | None = None
        if options.collector_rank == rank:
            self.collector = Collector(
                store,
                world_size=world_size,
                prefix=options.prefix,
                events_path=options.events_path,
                ranks_path=options.ranks_path,
                ranks_tags=options.ranks_tags,
                config=options.config,
                poll_s=options.poll_s,
                metrics_port=options.metrics_port,
                abort_on_hang=options.abort_on_hang,
                on_event=on_event,
            )
        self._step = 0
        self._closed = False
        self._hook: Any = None
        PROBE.buffer.drain()  # records from before the monitor belong to no step
        self.reporter.start()
        if self.collector is not None:
            self.collector.start()

    @property
    def events(self) -> list[AnomalyEvent]:
        """Findings so far (on the collector rank; empty elsewhere)."""
        return list(self.collector.events) if self.collector is not None else []

    @property
    def metrics_port(self) -> int | None:
        return self.collector.metrics_port if self.collector is not None else None

    def on_step_start(self, step: int) -> None:
        self._step = step
        self.reporter.step_start(step)

    def on_step_end(
        self, step: int, loss: float = float("nan"), step_time_s: float | None = None
    ) -> None:
        self.reporter.step_end(step, step_time_s)

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Mark one training step."""
        self.on_step_start(step)
        try:
            yield
        finally:
            self.on_step_end(step)

    def follow_optimizer(self, optimizer: Any, first_step: int = 0) -> None:
        """Count a step at every `optimizer.step()` (a post hook), for loops left unchanged."""
        self._step = first_step
        self.reporter.step_start(first_step)

        def post(*_: Any) -> None:
            self.reporter.step_end(self._step)
            self._step += 1
            self.reporter.step_start(self._step)

        self._hook = optimizer.register_step_post_hook(post)

    def close(self) -> None:
        """Ship the last summaries, say goodbye, stop the collector (after a short final
        look, so a crash that ends the job is still reported)."""
        if self._closed:
            return
        self._closed = True
        if self._hook is not None:
            self._hook.remove()
        self.reporter.close()
        if self.collector is not None:
            self.collector.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(
    *,
    store: StoreLike | None = None,
    optimizer: Any = None,
    options: MonitorOptions | None = None,
    on_event: Callable[[AnomalyEvent], None] | None = None,
    **option_fields: Any,
) -> Monitor:
    """Start monitoring this rank of an initialised torch.distributed job; return the Monitor.

    Args:
        store: where summaries go (default: the job's default store, the TCPStore of
            `init_process_group`).
        optimizer: if given, a step is counted at every `optimizer.step()`.
        options: a `MonitorOptions`; or pass its fields as keywords
            (`attach(events_path=..., metrics_port=0, abort_on_hang=True)`).
        on_event: called on the collector rank for each new finding.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "elastickit.monitor.attach: call torch.distributed.init_process_group "
            "first (with backend=elastickit.monitor.register_backend())"
        )
    if options is None:
        options = MonitorOptions(**option_fields)
    elif option_fields:
        raise TypeError("attach: pass either options= or option keywords, not both")
    if not str(dist.get_backend()).startswith("ekmon_"):
        warnings.warn(
            "elastickit.monitor: the process group does not use the probing backend; "
            "heartbeats (hang, crash) work but collectives are not timed. Pass "
            "backend=elastickit.monitor.register_backend() to init_process_group.",
            stacklevel=2,
        )
    if store is None:
        store = dist.distributed_c10d._get_default_store()
    mon = Monitor(
        store,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        options=options,
        on_event=on_event,
    )
    if optimizer is not None:
        mon.follow_optimizer(optimizer)
    return mon
