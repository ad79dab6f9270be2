"""elastickit.monitor: probes on the collectives, per-step summaries, the anomaly detector.

    import elastickit.monitor as ekm
    dist.init_process_group(backend=ekm.register_backend())
    with ekm.attach(events_path="events.jsonl", metrics_port=0) as mon:
        for step in range(n):
            with mon.step(step):
                ...

Imports nothing else of elastickit (DESIGN.md section 1); torch loads on first use.
"""

from .attach import Monitor, MonitorOptions, attach
from .collector import Collector
from .detector import AnomalyEvent, DetectorConfig, ObservedHeartbeat, detect
from .probe import PROBE, register_backend, set_interceptor
from .records import CollectiveRecord, RingBuffer
from .shipping import ABORT_EXIT_CODE, Reporter
from .summary import GroupStat, Heartbeat, InFlightOp, PeerStat, StepSummary, summarize

__all__ = [
    "ABORT_EXIT_CODE",
    "PROBE",
    "AnomalyEvent",
    "CollectiveRecord",
    "Collector",
    "DetectorConfig",
    "GroupStat",
    "Heartbeat",
    "InFlightOp",
    "Monitor",
    "MonitorOptions",
    "ObservedHeartbeat",
    "PeerStat",
    "Reporter",
    "RingBuffer",
    "StepSummary",
    "attach",
    "detect",
    "register_backend",
    "set_interceptor",
    "summarize",
]
