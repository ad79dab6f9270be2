"""Every panel of a run at one instant: what the page, `/api/*` and `elastickit top` show.

`summarize` is pure (logs, tier contents, live heartbeats, now -> panels); `Dashboard` feeds it
from a `RunReader`, a tier scan and an optional `StoreView`, and keeps the result for a short
while so that several pages polling at once cost one computation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import elastickit

from .checkpoints import checkpoints_panel
from .curves import curves_panel
from .events import events_panel
from .heatmap import heatmap_panel
from .incidents import incidents_panel
from .job import job_panel
from .links import links_panel
from .logs import RunLogs, RunReader, RunSources
from .records import current_step
from .recovery_point import TierContents, scan_tiers
from .store import StoreView

PANELS = ("job", "heatmap", "links", "incidents", "checkpoints", "curves", "events")


def summarize(logs: RunLogs, contents: TierContents, *, now: float,
              live: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """All seven panels, by name, plus `meta`."""
    step = current_step(logs.steps, logs.events, logs.summaries)
    return {
        "meta": {"label": logs.sources.label, "now": now, "version": logs.version,
                 "elastickit": elastickit.__version__, "live": live is not None},
        "job": job_panel(logs, now=now, live=live, current=step),
        "heatmap": heatmap_panel(logs),
        "links": links_panel(logs),
        "incidents": incidents_panel(logs),
        "checkpoints": checkpoints_panel(logs, contents, now=now, current_step=step),
        "curves": curves_panel(logs),
        "events": events_panel(logs),
    }


class Dashboard:
    """A run's panels, recomputed at most every `min_interval_s` (thread-safe)."""

    def __init__(self, sources: RunSources, *, live: StoreView | None = None,
                 clock: Callable[[], float] = time.time, min_interval_s: float = 0.5) -> None:
        self.sources = sources
        self.reader = RunReader(sources)
        self.live = live
        self.clock = clock
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._summary: dict[str, Any] | None = None
        self._logs: RunLogs | None = None

    def summary(self) -> dict[str, Any]:
        """Every panel now (or as of less than `min_interval_s` ago)."""
        with self._lock:
            now = self.clock()
            if self._summary is None or now - self._at >= self.min_interval_s:
                logs = self.reader.read()
                contents = scan_tiers(self.sources, logs.nodes)
                live = self.live.ranks() if self.live is not None else None
                self._summary = summarize(logs, contents, now=now, live=live)
                self._logs = logs
                self._at = now
            return self._summary

    def events(self, *, type: str = "", rank: int | None = None) -> dict[str, Any]:
        """The events panel with filters applied on the server."""
        self.summary()
        assert self._logs is not None
        return events_panel(self._logs, type=type, rank=rank)
