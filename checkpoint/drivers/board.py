"""The hand-over between the saves of the training thread and the tier workers.

`SnapshotBoard` alone holds the lock and the state both sides read: the newest snapshot, the
memory tier's snapshots, whether the training thread drains, and per file tier the step it waits
for, the snapshot handed to it, its flush request and its stop. The saving side (`AsyncWriter`)
calls `offer`, `flush`, `draining`, `stop`; a tier worker calls `take`, `find_or_wait`,
`gone`, `release`. Neither touches the other's fields.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..storage.memory import MEMORY, MemoryTier
from .clock import Clock
from .snapshot import Slot, SlotPool, Snapshot

#: The slot reference the board holds on the newest snapshot (a tier's reference is its name).
NEWEST = "newest"


@dataclass(frozen=True, slots=True)
class Taken:
    """What a tier worker took from the board for one round of its ranks.

    Attributes:
        snap: this rank's newest snapshot, pinned for the tier (None: it holds none).
        fresh: whether `snap` is newer than what the tier last wrote. A stale take joins the
            round only to answer the other ranks: this rank skipped a save they may hold.
        skipped: the newest step this rank skipped (no free host buffer), -1 for none.
    """

    snap: Snapshot | None
    fresh: bool
    skipped: int


class SnapshotBoard:
    """The snapshots in host buffers and who may take them (see the module docstring).

    Args:
        pool: the host buffers.
        memory: the memory tier (None: none), which keeps the newest snapshots.
        clock: what waits measure time by.
    """

    def __init__(self, pool: SlotPool, memory: MemoryTier | None, clock: Clock) -> None:
        self.pool = pool
        self.memory = memory
        self._clock = clock
        self._cond = threading.Condition()
        self._newest: Snapshot | None = None  # the snapshot a free tier takes next
        self._draining = False  # the training thread waits in drain(): no save will arrive
        self._wants: dict[str, int] = {}  # tier -> the step it waits for (a rank behind)
        self._handed: dict[str, Snapshot] = {}  # tier -> the save of that step, pinned for it
        self._flush: set[str] = set()  # tiers asked to take the newest now, without resting
        self._stopped: set[str] = set()
        self._attempted = -1  # the newest step the training thread tried to save
        self._skipped = -1  # the newest step it skipped (no free host buffer)

    # The saving side.

    def offer(self, nbytes: int, start: Callable[[Slot], Snapshot], step: int) -> Snapshot | None:
        """Take a free host buffer, start the snapshot of `step` in it (`start`) and make it the
        newest; None when tiers are writing from every buffer."""
        with self._cond:
            self._attempted = max(self._attempted, step)
            index = self._free_slot()
            if index is None:
                self._skipped = max(self._skipped, step)
                self._cond.notify_all()  # a tier waiting for `step` gives up on it
                return None
            waiting = [name for name, want in self._wants.items() if want == step]
            refs = {NEWEST, *waiting} | ({MEMORY} if self.memory is not None else set())
            snap = start(self.pool.acquire(index, nbytes, refs))
            for name in waiting:
                self._handed[name] = snap
            if self._newest is not None:
                self.pool.release(self._newest.slot, NEWEST)
            self._newest = snap
            if self.memory is not None:
                for old in self.memory.hold(snap):
                    self.pool.release(old.slot, MEMORY)
            self._cond.notify_all()
            return snap

    def flush(self, tiers: Iterable[str]) -> None:
        """Ask `tiers` to take the newest snapshot now, without resting."""
        with self._cond:
            self._flush.update(tiers)
            self._cond.notify_all()

    @contextmanager
    def draining(self) -> Iterator[None]:
        """While the training thread waits for the tiers: no save arrives, so a tier waiting
        for a step this rank skipped gives up instead."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._draining = False

    def stop(self, tier: str) -> None:
        """Let `tier`'s worker end once it has nothing fresh to write."""
        with self._cond:
            self._stopped.add(tier)
            self._cond.notify_all()

    # The tier workers' side.

    def take(
        self, tier: str, tried: Snapshot | None, rest_until: float, resting: Callable[[int], None], answered: int
    ) -> Taken | None:
        """Wait until `tier` may take a snapshot newer than `tried` (rested, flushed or
        stopping) and pin it for the tier; None when the tier stops with nothing fresh.
        `resting(step)` is called each time a fresh snapshot of `step` waits for the rest.

        Flushed or stopping with nothing fresh, the tier still joins one round (a stale take)
        when this rank skipped a step newer than `answered` (the newest skip or write its ranks
        already saw): the other ranks may be waiting in a round for that step, and only this
        rank can tell them that it will never hold it.
        """
        with self._cond:
            while True:
                newest = self._newest
                stopping = tier in self._stopped
                if newest is None or newest is tried:
                    flushed = tier in self._flush
                    self._flush.discard(tier)
                    if (flushed or stopping) and self._skipped > answered:
                        if newest is not None:
                            newest.slot.refs.add(tier)
                        return Taken(newest, fresh=False, skipped=self._skipped)
                    if stopping:
                        return None
                    self._clock.wait(self._cond, None)
                    continue
                wait = rest_until - self._clock.now()
                if tier in self._flush or stopping or wait <= 0:
                    newest.slot.refs.add(tier)
                    return Taken(newest, fresh=True, skipped=self._skipped)
                resting(newest.step)
                self._clock.wait(self._cond, wait)

    def find_or_wait(
        self, tier: str, step: int, mine: Snapshot | None, deadline: float, waiting: Callable[[], None]
    ) -> Snapshot | None:
        """This rank's snapshot of `step` pinned for `tier` (`mine`, pinned by `take`, is
        released unless it is that one); when this rank has not tried to save `step` yet, wait
        for the save (calling `waiting` first) until `deadline`, a newer save, a skipped one, a
        drain or a stop. None when it does not hold `step`."""
        with self._cond:
            snap = self._find(step, mine)
            if snap is None and (self._newest is None or self._newest.step < step) and self._attempted < step:
                self._wants[tier] = step
                self._handed.pop(tier, None)
                waiting()
                while tier not in self._handed and tier not in self._stopped and self._clock.now() < deadline:
                    if self._attempted >= step:
                        break  # it saved a newer step, or skipped this one (no free buffer)
                    if self._draining:
                        break  # no save arrives while the training thread drains
                    self._clock.wait(self._cond, min(1.0, max(0.0, deadline - self._clock.now())))
                snap = self._handed.pop(tier, None)
                del self._wants[tier]
            elif snap is not None and snap is not mine:
                snap.slot.refs.add(tier)
            if mine is not None and snap is not mine:
                self.pool.release(mine.slot, tier)
            return snap

    def gone(self, tier: str, step: int) -> bool:
        """Whether this rank will never hold `step` for `tier`: it skipped that save and holds
        nothing newer, or the training thread drains, or the tier stops."""
        with self._cond:
            if self._draining or tier in self._stopped:
                return True
            return self._attempted >= step and (self._newest is None or self._newest.step < step)

    def release(self, tier: str, snaps: Iterable[Snapshot]) -> None:
        """`tier` is done with `snaps`."""
        with self._cond:
            for s in snaps:
                self.pool.release(s.slot, tier)

    # Internals (with the lock held).

    def _find(self, step: int, mine: Snapshot | None) -> Snapshot | None:
        """The newest snapshot of `step` still in a host buffer."""
        for snap in reversed([*([mine] if mine is not None else []), *self._live()]):
            if snap.step == step and snap.slot.refs:
                return snap
        return None

    def _free_slot(self) -> int | None:
        """The host buffer for a new snapshot, preferring warm memory.

        First a buffer this save releases anyway (the snapshot it replaces as the newest, or
        the memory tier's oldest beyond `keep_last`) when no tier holds it: its pages are
        mapped already. Then a free buffer, a new one, or the oldest that only the memory tier
        still holds. None when tiers are writing from every buffer.
        """
        outgoing = self.memory.outgoing() if self.memory is not None else []
        if self._newest is not None and not self._held_in_memory(self._newest):
            outgoing.append(self._newest)
        for snap in outgoing:
            if snap.slot.refs <= {MEMORY, NEWEST}:
                return self._evict(snap)
        for sl in self.pool.slots:
            if not sl.refs:
                return sl.index
        if self.pool.count() < self.pool.max_slots:
            return self.pool.count()
        for snap in self._live():
            if snap.slot.refs <= {MEMORY, NEWEST}:
                return self._evict(snap)
        return None

    def _live(self) -> list[Snapshot]:
        """The snapshots still in host buffers for the memory tier or as the newest, oldest first."""
        newest, memory = self._newest, self.memory.snapshots() if self.memory is not None else []
        return [*memory, *([newest] if newest is not None and newest not in memory else [])]

    def _held_in_memory(self, snap: Snapshot) -> bool:
        return self.memory is not None and snap in self.memory

    def _evict(self, snap: Snapshot) -> int:
        """Take `snap`'s buffer back from the memory tier."""
        if self.memory is not None:
            self.memory.drop(snap)
        if snap is self._newest:
            self._newest = None
        snap.slot.refs.clear()
        return snap.slot.index
