"""Background threads that yield the CPU to training."""

from __future__ import annotations

import os
import threading

#: The nice value of elastickit's background threads (0 leaves them at the training
#: thread's priority).
BACKGROUND_NICE = int(os.environ.get("ELASTICKIT_BACKGROUND_NICE", "10"))


def lower_priority(nice: int | None = None) -> None:
    """Make the calling thread yield the CPU to the training threads (Linux: a per-thread nice).

    Checkpoint work is never on the training loop's critical path but competes with it for
    cores; at a higher nice value the scheduler runs it in the cycles training leaves free.
    """
    nice = BACKGROUND_NICE if nice is None else nice
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError:  # not allowed here: run at normal priority
        pass
