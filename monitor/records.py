"""What a probe records: one `CollectiveRecord` per operation, kept in a bounded ring buffer.

The buffer is written by the training thread (enter) and by the communication backend's
threads (exit, from the Work's future). It never blocks for long and never raises: appending
to a `collections.deque` with `maxlen` is atomic under the GIL, and the oldest records fall off
when a reader is late.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading

# Operation kinds. Point-to-point operations are not numbered in the group's collective
# sequence: only the two ends take part, so their order says nothing about the other members.
P2P_OPS = frozenset({"send", "recv", "recv_anysource"})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveRecord:
    """One operation as one rank saw it.

    Attributes:
        op: the ProcessGroup method called (`allreduce`, `all_gather_single`, `send`, ...).
        group: the process group's name (`"0"` is the default group).
        group_ranks: the global ranks of that group, in group-rank order.
        peer: for send/recv, the global rank of the other end; -1 for a collective.
        num_bytes: bytes of the input tensors.
        seq: for a collective, its 1-based sequence number within the group (the same on
            every member); for send/recv, the sequence number per (group, peer, direction).
        enter_s: `time.time()` when the rank called the operation.
        exit_s: `time.time()` when the operation completed on this rank; -1.0 while in flight.
        ok: False when the operation raised or its Work completed with an error.
    """

    op: str
    group: str
    group_ranks: tuple[int, ...]
    peer: int
    num_bytes: int
    seq: int
    enter_s: float
    exit_s: float
    ok: bool = True

    @property
    def wait_s(self) -> float:
        """Time the rank spent in the operation (exit - enter); clock-independent."""
        return max(0.0, self.exit_s - self.enter_s) if self.exit_s >= 0 else 0.0

    @property
    def is_p2p(self) -> bool:
        return self.op in P2P_OPS


class _Pending:
    """A mutable record while the operation is in flight (internal)."""

    __slots__ = (
        "enter_s",
        "exit_s",
        "group",
        "group_ranks",
        "id",
        "num_bytes",
        "ok",
        "op",
        "peer",
        "seq",
    )

    def __init__(
        self,
        op: str,
        group: str,
        group_ranks: tuple[int, ...],
        peer: int,
        num_bytes: int,
        seq: int,
        enter_s: float,
        op_id: int,
    ) -> None:
        self.op = op
        self.group = group
        self.group_ranks = group_ranks
        self.peer = peer
        self.num_bytes = num_bytes
        self.seq = seq
        self.enter_s = enter_s
        self.exit_s = -1.0
        self.ok = True
        self.id = op_id

    def freeze(self) -> CollectiveRecord:
        return CollectiveRecord(
            op=self.op,
            group=self.group,
            group_ranks=self.group_ranks,
            peer=self.peer,
            num_bytes=self.num_bytes,
            seq=self.seq,
            enter_s=self.enter_s,
            exit_s=self.exit_s,
            ok=self.ok,
        )


class RingBuffer:
    """Bounded store of the most recent operations, plus the set of operations in flight.

    `drain()` hands each completed record out once, in completion order; `in_flight()` lists
    the operations entered and not yet completed (what a hang detector needs).
    """

    def __init__(self, capacity: int = 65536, max_in_flight: int = 4096) -> None:
        if capacity <= 0 or max_in_flight <= 0:
            raise ValueError(
                f"capacity and max_in_flight must be positive, got {capacity}, {max_in_flight}"
            )
        self.max_in_flight = max_in_flight
        self._done: collections.deque[_Pending] = collections.deque(maxlen=capacity)
        self._in_flight: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.dropped = 0
        # Highest collective seq entered per group, and p2p seq per (group, op, peer): lets the
        # collector see which ranks never entered an operation the others are waiting in.
        self.entered: dict[str, int] = {}
        self.entered_p2p: dict[tuple[str, str, int], int] = {}

    def enter(
        self,
        op: str,
        group: str,
        group_ranks: tuple[int, ...],
        peer: int,
        num_bytes: int,
        seq: int,
        enter_s: float,
    ) -> _Pending:
        p = _Pending(op, group, group_ranks, peer, num_bytes, seq, enter_s, next(self._ids))
        with self._lock:
            if len(self._in_flight) >= self.max_in_flight:
                # A Work nobody waits on (fire-and-forget isend on gloo) never completes here:
                # forget the oldest rather than grow without bound.
                self._in_flight.pop(next(iter(self._in_flight)))
                self.dropped += 1
            self._in_flight[p.id] = p
            if peer == -1:
                self.entered[group] = seq
            else:
                self.entered_p2p[(group, op, peer)] = seq
        return p

    def complete(self, p: _Pending, exit_s: float, ok: bool) -> None:
        p.exit_s = exit_s
        p.ok = ok
        with self._lock:
            if self._in_flight.pop(p.id, None) is None:
                return  # completed twice (error path after success): keep the first
            if len(self._done) == self._done.maxlen:
                self.dropped += 1
            self._done.append(p)

    def drain(self) -> list[CollectiveRecord]:
        """Remove and return the completed records, oldest first."""
        with self._lock:
            items = list(self._done)
            self._done.clear()
        return [p.freeze() for p in items]

    def in_flight(self) -> list[CollectiveRecord]:
        """The operations entered and not completed yet (exit_s == -1)."""
        with self._lock:
            items = list(self._in_flight.values())
        return [p.freeze() for p in items]

    def newest_in_flight(self) -> float | None:
        """Enter time (Unix seconds) of the newest operation in flight; None when none is."""
        with self._lock:
            return max((p.enter_s for p in self._in_flight.values()), default=None)

    def entered_seqs(self) -> tuple[dict[str, int], dict[tuple[str, str, int], int]]:
        """(collective seq per group, p2p seq per (group, op, peer)) last entered."""
        with self._lock:
            return dict(self.entered), dict(self.entered_p2p)
