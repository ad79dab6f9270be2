"""The time the save scheduler reads and waits on, injectable so that tests drive it step by step.

The scheduler reads three things from its clock: the time (for a tier's rest and a wait's
deadline), the CPU time its own thread used (what a write cost, see
`TierSpec.max_busy_fraction`), and a wait on a condition that ends at a notification or after
some seconds. `SYSTEM` is the real one. `ManualClock` moves only when a test says so: a wait
with a timeout ends only when the condition is notified or the test advances past it, so a test
decides when a tier's rest is over instead of sleeping.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def thread_cpu(self) -> float:
        """CPU seconds the calling thread used so far."""
        ...

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        """Wait on `cond` (held by the caller) until notified or `timeout` seconds passed."""
        ...


class SystemClock:
    """The real clock: `time.monotonic`, `time.thread_time`, `Condition.wait`."""

    def now(self) -> float:
        return time.monotonic()

    def thread_cpu(self) -> float:
        return time.thread_time()

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        cond.wait(timeout)


SYSTEM = SystemClock()


class ManualClock:
    """A clock that moves only on `advance` (tests).

    Args:
        start: the time it starts at.
        cpu_per_read: how far every reading of `thread_cpu` moves the calling thread's CPU time
            on, so that each piece of work a thread measures (two readings) cost exactly this
            many CPU seconds.
    """

    def __init__(self, start: float = 0.0, *, cpu_per_read: float = 0.0) -> None:
        self._now = start
        self._cpu_per_read = cpu_per_read
        self._lock = threading.Lock()
        self._waiting: weakref.WeakSet[threading.Condition] = weakref.WeakSet()
        self._moves = 0  # how often `advance` moved the time
        self._seen = threading.local()  # the moves a thread had seen when it last read the time

    def now(self) -> float:
        with self._lock:
            self._seen.moves = self._moves
            return self._now

    def thread_cpu(self) -> float:
        used = getattr(self._seen, "cpu", 0.0) + self._cpu_per_read  # each thread its own
        self._seen.cpu = used
        return used

    def wait(self, cond: threading.Condition, timeout: float | None) -> None:
        # Real time does not count: only a notification, or `advance`, ends the wait. A wait
        # for a time the caller computed before an `advance` it did not see ends at once (the
        # caller looks at the clock again), so no advance is ever missed.
        with self._lock:
            self._waiting.add(cond)
            if timeout is not None and getattr(self._seen, "moves", -1) != self._moves:
                return
        cond.wait()

    def advance(self, seconds: float) -> None:
        """Move the time on and wake every waiter, which then looks at the clock again."""
        with self._lock:
            self._now += seconds
            self._moves += 1
            conds = list(self._waiting)
        for cond in conds:
            with cond:
                cond.notify_all()
