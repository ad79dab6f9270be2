"""Ranks ship summaries and heartbeats through the job's store; the collector reads them.

Keys (under a prefix, default "ekmon"):
    <prefix>/s/<rank>/<n>   the rank's n-th StepSummary (n = 0, 1, 2, ... per rank)
    <prefix>/hb/<rank>      the rank's latest Heartbeat
    <prefix>/abort          set by the collector to stop every rank (abort on hang)

The training thread only folds the step's records into a summary and queues it; a daemon
thread talks to the store, so a slow or dead store never blocks or breaks training.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from .records import RingBuffer
from .summary import Heartbeat, InFlightOp, StepSummary, summarize

ABORT_EXIT_CODE = 75


class StoreLike(Protocol):
    """The part of `torch.distributed.Store` the monitor uses."""

    def set(self, key: str, value: str | bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def check(self, keys: list[str]) -> bool: ...


def summary_key(prefix: str, rank: int, n: int) -> str:
    return f"{prefix}/s/{rank}/{n}"


def heartbeat_key(prefix: str, rank: int) -> str:
    return f"{prefix}/hb/{rank}"


def abort_key(prefix: str) -> str:
    return f"{prefix}/abort"


def _default_abort(reason: str) -> None:
    print(f"elastickit.monitor: aborting this rank: {reason}", flush=True)
    os._exit(ABORT_EXIT_CODE)


class Reporter:
    """One per rank: turns steps into summaries and ships them with heartbeats.

    Call order: `start()`, then per step `step_start(step)` ... `step_end(step)`, then
    `close()`. All methods return at once; store traffic happens on the reporter's thread
    (except `beat()`, which sends a heartbeat from the caller, for a process about to exit).
    """

    def __init__(
        self,
        store: StoreLike,
        *,
        rank: int,
        buffer: RingBuffer,
        prefix: str = "ekmon",
        interval_s: float = 0.2,
        on_abort: Callable[[str], None] | None = _default_abort,
    ) -> None:
        self.store = store
        self.rank = rank
        self.buffer = buffer
        self.prefix = prefix
        self.interval_s = interval_s
        self.on_abort = on_abort
        self.errors = 0
        self._pid = os.getpid()
        self._host = socket.gethostname()
        self._beat = 0
        self._n = 0
        self._step = -1
        self._step_t0 = time.perf_counter()
        self._queue: list[StepSummary] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state = "running"
        self._thread = threading.Thread(
            target=self._run, name=f"ekmon-reporter-{rank}", daemon=True
        )

    def start(self) -> None:
        self._send_heartbeat()
        self._thread.start()

    def step_start(self, step: int) -> None:
        self._step = step
        self._step_t0 = time.perf_counter()

    def step_end(self, step: int, step_time_s: float | None = None) -> StepSummary:
        """Summarise the records completed since the last call; queue the summary."""
        if step_time_s is None:
            step_time_s = time.perf_counter() - self._step_t0
        summary = summarize(
            self.buffer.drain(),
            rank=self.rank,
            step=step,
            time_s=time.time(),
            step_time_s=max(0.0, step_time_s),
        )
        with self._lock:
            self._queue.append(summary)
        self._wake.set()
        return summary

    def close(self) -> None:
        """Flush what is queued and say goodbye (so the collector sees no crash)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self._state = "closed"
        self._flush()
        self._send_heartbeat()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._flush()
            self._send_heartbeat()
            self._check_abort()
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def _flush(self) -> None:
        with self._lock:
            items, self._queue = self._queue, []
        for i, s in enumerate(items):
            try:
                self.store.set(summary_key(self.prefix, self.rank, self._n), s.to_json())
                self._n += 1
            except Exception:  # noqa: BLE001 - keep the rest for the next round
                self.errors += 1
                with self._lock:
                    self._queue[:0] = items[i:]
                return

    def heartbeat(self) -> Heartbeat:
        now = time.time()
        entered, entered_p2p = self.buffer.entered_seqs()
        in_flight = tuple(
            InFlightOp(
                op=r.op,
                group=r.group,
                ranks=r.group_ranks,
                peer=r.peer,
                seq=r.seq,
                age_s=max(0.0, now - r.enter_s),
            )
            for r in self.buffer.in_flight()
        )
        self._beat += 1
        return Heartbeat(
            rank=self.rank,
            pid=self._pid,
            host=self._host,
            beat=self._beat,
            time_s=now,
            step=self._step,
            state=self._state,
            in_flight=in_flight,
            entered=tuple(sorted(entered.items())),
            entered_p2p=tuple(sorted((g, o, p, s) for (g, o, p), s in entered_p2p.items())),
        )

    def beat(self) -> None:
        """Send a heartbeat now (with the current step), from the calling thread."""
        self._send_heartbeat()

    def _send_heartbeat(self) -> None:
        try:
            self.store.set(heartbeat_key(self.prefix, self.rank), self.heartbeat().to_json())
        except Exception:  # noqa: BLE001
            self.errors += 1

    def _check_abort(self) -> None:
        try:
            if not self.store.check([abort_key(self.prefix)]):
                return
            reason = json.loads(self.store.get(abort_key(self.prefix))).get("reason", "hang")
        except Exception:  # noqa: BLE001
            return
        if self.on_abort is not None:
            self.on_abort(str(reason))
