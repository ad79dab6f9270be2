"""Coordination between the ranks of one save or restore, without the training process group.

Checkpoints are coordinated through a key-value store (the job's TCPStore) rather than
collectives on the training group: a background thread can commit a checkpoint while the
training thread runs its own collectives, and nothing here depends on the backend (gloo, NCCL).
Messages are JSON; nothing is pickled.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any, Protocol

from .errors import RankFailure


class StoreLike(Protocol):
    """The part of `torch.distributed.Store` that coordination needs."""

    def set(self, key: str, value: bytes | str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def wait(self, keys: list[str], timeout: timedelta) -> None: ...
    def check(self, keys: list[str]) -> bool: ...
    def delete_key(self, key: str) -> bool: ...


class Coordinator(Protocol):
    """All-gather of JSON values among the ranks of a job; every rank calls in the same order."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_gather(self, value: Any, *, phase: str) -> list[Any]:
        """Every rank's `value`, index = rank."""
        ...


class LocalCoordinator:
    """The coordinator of a single process."""

    rank = 0
    world_size = 1

    def all_gather(self, value: Any, *, phase: str) -> list[Any]:
        return [json.loads(json.dumps(value))]


class StoreCoordinator:
    """All-gather through a store: rank r sets `<prefix>/<round>/<r>`, then waits for the others.

    Each coordinator talks through its own clone of the store's client when the store can be
    cloned (TCPStore, FileStore): a blocking wait then holds up no other thread. Without a
    clone it polls with `check`, because a shared TCPStore client serves one request at a time
    and a blocking wait from one thread (a tier committing) would hold up every other thread of
    the process using it (another tier, a restore): two ranks could wait on each other
    for ever. Keys of round n are deleted by their owner at round n+2, when every rank has
    provably read them (it has reached round n+1).
    """

    def __init__(
        self, store: StoreLike, *, rank: int, world_size: int, prefix: str, timeout_s: float = 600.0
    ) -> None:
        self._private = False
        clone = getattr(store, "clone", None)
        if clone is not None:
            try:
                store = clone()
                self._private = True
            except Exception:  # a store that cannot clone itself: share it and poll
                pass
        self._store = store
        self._rank = rank
        self._world = world_size
        self._prefix = prefix
        self._timeout = timedelta(seconds=timeout_s)
        self._round = 0
        self._lock = threading.Lock()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    def all_gather(self, value: Any, *, phase: str) -> list[Any]:
        with self._lock:
            n = self._round
            self._round += 1
            self._store.set(f"{self._prefix}/{n}/{self._rank}", json.dumps(value))
            keys = [f"{self._prefix}/{n}/{r}" for r in range(self._world)]
            try:
                self._wait(keys)
            except Exception as e:  # the store's timeout error type differs across versions
                missing = self._missing(keys)
                raise RankFailure(
                    f"rank(s) {missing} did not reach checkpoint phase {phase!r} within "
                    f"{self._timeout.total_seconds():.0f} s ({e}); a rank died or hangs",
                    causes={r: f"never reached {phase}" for r in missing},
                ) from e
            multi_get = getattr(self._store, "multi_get", None)
            raw = multi_get(keys) if multi_get is not None else [self._store.get(k) for k in keys]
            out = [json.loads(v) for v in raw]
            if n >= 2:
                try:
                    self._store.delete_key(f"{self._prefix}/{n - 2}/{self._rank}")
                except Exception:  # a store without delete_key: keys are small, keep them
                    pass
            return out

    def _wait(self, keys: list[str]) -> None:
        if self._private:
            self._store.wait(keys, self._timeout)
            return
        deadline = time.monotonic() + self._timeout.total_seconds()
        pause = 0.0002
        while not self._store.check(keys):
            if time.monotonic() > deadline:
                raise TimeoutError(f"keys not set within {self._timeout.total_seconds():.0f} s")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.005)

    def _missing(self, keys: list[str]) -> list[int]:
        """The ranks whose key is not in the store. Once the store cannot answer (its connection
        was shut: an elastic job aborting a generation does it on purpose), the rest count as
        missing without asking: each failed request on a dead connection costs a warning and a
        reverse DNS lookup in c10d, dozens at once after a hang."""
        out = []
        for r, key in enumerate(keys):
            if r == self._rank:
                continue  # its own key was set before the wait
            try:
                if not self._store.check([key]):
                    out.append(r)
            except Exception:  # noqa: BLE001 - any failure: the connection is gone
                return out + [q for q in range(r, len(keys)) if q != self._rank]
        return out


def gather_or_raise(coord: Coordinator, error: str | None, payload: Any, *, phase: str) -> list[Any]:
    """All-gather `payload`; if any rank reports an error, raise RankFailure on every rank.

    The message names each failing rank and its one-sentence cause.
    """
    got = coord.all_gather({"error": error, "payload": payload}, phase=phase)
    causes = {r: g["error"] for r, g in enumerate(got) if g["error"]}
    if causes:
        first = min(causes)
        more = f" (and {len(causes) - 1} more rank(s))" if len(causes) > 1 else ""
        if coord.world_size == 1:
            raise RankFailure(causes[first], causes=causes)
        raise RankFailure(f"{phase} failed on rank {first}: {causes[first]}{more}", causes=causes)
    return [g["payload"] for g in got]
