"""Prometheus metrics of the collector (prometheus-client), served on 127.0.0.1 by default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .detector import AnomalyEvent
from .summary import StepSummary


class Metrics:
    """The collector's gauges and counters, in a registry of their own.

    `port=0` picks a free port; `self.port` says which. Binding anything but 127.0.0.1 is the
    caller's decision (DESIGN.md section 8).
    """

    def __init__(self, *, port: int = 0, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry
        self.step_time = Gauge(
            "ekmon_step_time_seconds", "Last step time per rank", ["rank"], registry=r
        )
        self.wait_share = Gauge(
            "ekmon_wait_share",
            "Share of the step spent waiting in collectives",
            ["rank"],
            registry=r,
        )
        self.latency = Gauge(
            "ekmon_collective_latency_seconds",
            "Mean per-operation time of the group's fastest member (transfer time)",
            ["group"],
            registry=r,
        )
        self.straggler = Gauge(
            "ekmon_straggler_score",
            "How much the others wait for this rank, as a share of the step time",
            ["rank"],
            registry=r,
        )
        self.silence = Gauge(
            "ekmon_heartbeat_silence_seconds",
            "Time since the rank's heartbeat last changed",
            ["rank"],
            registry=r,
        )
        self.events = Counter("ekmon_events", "Anomaly events by type", ["type"], registry=r)
        for t in ("slow_rank", "slow_link", "hang", "crash"):
            self.events.labels(type=t)
        self._server: Any = None
        self._server, _thread = start_http_server(port, addr=host, registry=r)
        self.port = int(self._server.server_port)
        self.host = host

    def update(
        self,
        last: Mapping[int, StepSummary],
        scores: Mapping[int, float],
        silence: Mapping[int, float],
    ) -> None:
        floors: dict[str, list[float]] = {}
        for rank, s in last.items():
            self.step_time.labels(rank=str(rank)).set(s.step_time_s)
            self.wait_share.labels(rank=str(rank)).set(
                s.wait_s / s.step_time_s if s.step_time_s > 0 else 0.0
            )
            for g in s.groups:
                if g.num_ops:
                    floors.setdefault(g.group, []).append(g.wait_s / g.num_ops)
        for group, vals in floors.items():
            self.latency.labels(group=group).set(min(vals))
        for rank, v in scores.items():
            self.straggler.labels(rank=str(rank)).set(v)
        for rank, v in silence.items():
            self.silence.labels(rank=str(rank)).set(v)

    def count(self, events: Sequence[AnomalyEvent]) -> None:
        for e in events:
            self.events.labels(type=e.type).inc()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

