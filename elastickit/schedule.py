"""When a checkpoint is due: the interval policy, fed with the measured step time and save cost.

A step-based policy decides locally (every rank computes the same answer). A time-based one
needs the ranks to agree: after each save, rank 0 picks the next due step and a store round
carries it to every rank, off the training thread; the next `save` waits for that round, which by
then has long finished.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from elastickit.checkpoint.coord import Coordinator, gather_or_raise
from elastickit.checkpoint.drivers.threads import lower_priority
from elastickit.checkpoint.policy import IntervalPolicy


class SaveSchedule:
    """The due steps of one Checkpointer (see the module docstring). `clock`: seconds, monotonic."""

    def __init__(self, policy: IntervalPolicy, coord: Coordinator, *, rank: int, world_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._coord = coord
        self._rank = rank
        self._clock = clock
        self._next_due: int | None = None
        self._last_call: tuple[int, float] | None = None
        self.step_time_s = 0.0
        self.cost_s = 0.0
        self._round: Future[None] | None = None
        self._rounds: queue.SimpleQueue[tuple[int | None, Future[None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if world_size > 1 and not policy.step_based:
            self._thread = threading.Thread(target=self._loop, name="elastickit-round", daemon=True)
            self._thread.start()

    def due(self, step: int) -> bool:
        """Whether a checkpoint is taken at `step` (the same answer on every rank)."""
        if self.policy.step_based:
            return step % self.policy.every_n == 0
        return self._next_due is None or step >= self._next_due

    def called(self, step: int) -> None:
        """`save` was called at `step`: measure the time per step."""
        now = self._clock()
        last = self._last_call
        if last is not None and step > last[0]:
            dt = (now - last[1]) / (step - last[0])
            self.step_time_s = dt if not self.step_time_s else 0.8 * self.step_time_s + 0.2 * dt
        self._last_call = (step, now)

    def saved(self, step: int, cost_s: float) -> None:
        """A save at `step` cost the training thread `cost_s`; a time-based policy picks the next
        due step now (from the costs measured before this one)."""
        if not self.policy.step_based:
            self._start_round(step)
        self.cost_s = cost_s if not self.cost_s else 0.8 * self.cost_s + 0.2 * cost_s

    def _start_round(self, step: int) -> None:
        next_due = None
        if self._rank == 0:
            next_due = self.policy.next_due_step(step, step_time_s=self.step_time_s, cost_s=self.cost_s)
        done: Future[None] = Future()
        self._round = done
        if self._thread is None:
            self._run(next_due, done)
        else:
            self._rounds.put((next_due, done))

    def settle(self) -> None:
        """Wait for the round in flight; raise its failure once."""
        done = self._round
        if done is None:
            return
        try:
            done.result()
        except BaseException:
            self._round = None
            raise

    def close(self) -> None:
        if self._thread is not None:
            self._rounds.put(None)
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        lower_priority()
        while True:
            job = self._rounds.get()
            if job is None:
                return
            self._run(*job)

    def _run(self, next_due: int | None, done: Future[None]) -> None:
        try:
            got = gather_or_raise(self._coord, None, next_due, phase="checkpoint schedule")
        except BaseException as e:  # raised on the training thread by the next save
            done.set_exception(e)
            return
        self._next_due = got[0]
        done.set_result(None)
