"""The communication monitor in an elastic job: one monitor per generation.

Every generation's process groups use the probing backend (`elastickit.monitor`), so each
collective is timed. Each rank of a generation ships its step summaries through the
generation's own store prefix; the collector runs on the generation's rank 0 and appends them to
`RUN/ranks.jsonl` (the dashboard's step-time heatmap and link matrix), each line tagged with the
generation and the worker that held the rank:

    {"rank": 1, "step": 17, ..., "gen": 2, "node": "2", "local_rank": 0,
     "member": "2.0.host.4242", "world_size": 2, "layout": "pp=1,dp=2,tp=1"}

so that across generations a rank number is never taken for another worker's. Steps are numbered
as in `steps.jsonl` (the first step is 1). Its findings (slow ranks, slow links, hangs and
crashes it sees) go to `RUN/events.jsonl`. The monitor never aborts anything here: failures are
the membership's to handle (`elastickit.elastic.membership`).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["backend", "close_monitor", "start_monitor"]


def backend() -> str:
    """The process-group backend of a generation: gloo inside the monitor's probes."""
    from elastickit.monitor import register_backend

    return register_backend()


def start_monitor(store: Any, *, plan: Any, rank: int, members: dict[str, Any], run: Any) -> Any:
    """The Monitor of this rank in `plan` (collector on rank 0), shipping through `store` (the
    generation's store: its connection ends with the generation)."""
    import torch.distributed as dist

    from elastickit.monitor import Monitor, MonitorOptions

    tags = {}
    for r, mid in enumerate(plan.active):
        m = members.get(mid)
        tags[r] = {
            "gen": plan.gen,
            "node": m.node if m is not None else mid.split(".")[0],
            "local_rank": m.local_rank if m is not None else -1,
            "member": mid,
            "world_size": plan.world_size,
            "layout": plan.layout,
        }
    options = MonitorOptions(
        events_path=run.events,
        ranks_path=run.ranks,
        ranks_tags=tags,
        collector_rank=0,
        abort_on_hang=False,
        prefix="ekmon",
    )
    return Monitor(dist.PrefixStore("mon", store), rank=rank, world_size=plan.world_size, options=options)


def close_monitor(monitor: Any, *, wait_s: float) -> threading.Event:
    """Stop `monitor` on a thread: ship this rank's last summaries, and on the collector's rank
    read for up to `wait_s` what the other ranks ship until all have closed (0 after a failure:
    the generation's store connection may be gone). The event is set when done."""
    done = threading.Event()

    def close() -> None:
        try:
            monitor.reporter.close()
            if monitor.collector is not None:
                monitor.collector.close(final_wait_s=wait_s)
        except Exception:  # noqa: BLE001 - advisory: a monitor never fails the job
            pass
        finally:
            done.set()

    threading.Thread(target=close, name="elastickit-monitor-close", daemon=True).start()
    return done
