"""elastickit.monitor: probes on the collectives, per-step summaries, the anomaly detector.

Imports nothing else of elastickit (DESIGN.md section 1).
"""

from .probe import PROBE, register_backend, set_interceptor
from .records import CollectiveRecord, RingBuffer

__all__ = ["PROBE", "CollectiveRecord", "RingBuffer", "register_backend", "set_interceptor"]
