"""A live worker whose training loop stopped: telling the rank everyone waits on from the
ranks that wait.

A heartbeat proves that a process lives (its watcher thread beats); it says nothing of the
training thread, which may be stuck in a deadlock, a data loader or a lost device while the
heartbeat goes on. So next to its heartbeat every member publishes its loop's `Progress`: a
counter that moves whenever the loop enters a collective or completes a step, and whether the
loop is blocked inside a collective right now (the probing backend's operations in flight).

The rule (`ProgressWatch.stuck`): while this member has been blocked in a collective for
`hang_s` (someone it needs is not coming), a peer that trains, is not blocked in a collective
itself, and whose counter has not moved for its progress bound, is the rank the others wait
on: its loop is hung. Ranks blocked in the same collective accuse nobody among themselves (each
of them is blocked), and a slow peer still computing moves its counter at its next collective.
The bound stretches with the peer's recent intervals between moves, as the heartbeat's silence
bound does (`Membership.silence_bound`): a loaded machine makes long gaps without hangs.
"""

from __future__ import annotations

import collections
import dataclasses

__all__ = ["IDLE", "Progress", "ProgressWatch"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """One member's training loop as its watcher last saw it."""

    counter: str
    """Opaque; it changes whenever the loop makes progress (compare for equality only)."""
    blocked: bool = False
    """Inside a collective (entered, not completed)."""
    training: bool = True
    """Running steps (False: forming a generation, waiting as a spare; never judged)."""
    gen: int = 0
    """The plan the loop trains in: a record of an older plan than the judge's proves nothing
    (a loop that was just woken out of a superseded plan's collective is leaving it)."""

    def encode(self) -> str:
        return f"{int(self.blocked)}{int(self.training)}|{self.gen}|{self.counter}"

    @classmethod
    def decode(cls, text: str | bytes) -> Progress:
        raw = text.decode() if isinstance(text, bytes) else text
        flags, _, rest = raw.partition("|")
        gen, _, counter = rest.partition("|")
        return cls(counter=counter, blocked=flags[:1] == "1", training=flags[1:2] == "1", gen=int(gen or 0))


IDLE = Progress(counter="", blocked=False, training=False)
"""What a member not training publishes."""


class ProgressWatch:
    """The progress records of the members one watcher looks at (see the module docstring)."""

    def __init__(self, hang_s: float) -> None:
        self.hang_s = hang_s
        self._last: dict[str, Progress] = {}
        self._moved: dict[str, float] = {}  # monotonic time the counter last changed
        self._moves: dict[str, int] = {}
        self._gaps: dict[str, collections.deque[float]] = {}

    def observe(self, member: str, progress: Progress, now: float, *, stalled: bool = False) -> None:
        """Record what `member` published at `now` (`stalled`: this watcher itself was
        descheduled, so an unchanged counter proves nothing this round)."""
        old = self._last.get(member)
        # A collective that completed (blocked -> not) is progress too.
        if old is None or old.counter != progress.counter or old.training != progress.training or (
            old.blocked and not progress.blocked
        ) or stalled:
            if old is not None and member in self._moved and not stalled:
                self._gaps.setdefault(member, collections.deque(maxlen=200)).append(now - self._moved[member])
            self._moved[member] = now
            self._moves[member] = self._moves.get(member, 0) + (old is not None)
        self._last[member] = progress

    def bound(self, member: str) -> float:
        """How long `member`'s counter may stand still: `hang_s`, or 2.5x its longest recent
        interval between moves under load (at most 5x `hang_s`)."""
        gaps = self._gaps.get(member)
        if not gaps:
            return self.hang_s
        return min(5 * self.hang_s, max(self.hang_s, 2.5 * max(gaps)))

    def stuck(self, member: str, now: float, gen: int | None = None) -> bool:
        """`member` trains (in plan `gen`, if given), is not blocked in a collective, and its
        counter stood still for its bound (having moved at least once since first seen: a member
        just starting is not judged)."""
        last = self._last.get(member)
        if last is None or last.blocked or not last.training or self._moves.get(member, 0) < 1:
            return False
        if gen is not None and last.gen != gen:
            return False
        return now - self._moved[member] >= self.bound(member)

    def idle_s(self, member: str, now: float) -> float:
        """Seconds since `member`'s counter last moved (0 if never seen)."""
        moved = self._moved.get(member)
        return 0.0 if moved is None else now - moved

    def forget(self, member: str) -> None:
        """A member that left the plan: its next record starts a fresh history."""
        self._last.pop(member, None)
        self._moved.pop(member, None)
        self._moves.pop(member, None)
