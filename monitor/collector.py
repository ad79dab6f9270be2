"""The collector: reads every rank's summaries and heartbeats, runs the detector, reports.

It runs on rank 0 (a daemon thread) or in any process that can reach the store (a launcher).
Each new finding is appended to the events file as one JSON line (flushed at once), counted
in the Prometheus metrics and passed to `on_event`. With `ranks_path`, every step summary it
reads is appended there too (one JSON line per rank and step: what the dashboard's step-time
heatmap and link matrix are drawn from after the job is gone), with `ranks_tags[rank]`'s fields
added to each of that rank's lines. On a hang, with `abort_on_hang`, it sets
the store's abort key (every rank's reporter exits with ABORT_EXIT_CODE when it sees it) and
calls `on_abort`, so torchrun restarts the job now instead of after the collective timeout.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .detector import (
    AnomalyEvent,
    DetectorConfig,
    ObservedHeartbeat,
    complete_steps,
    detect,
    straggler_scores,
)
from .metrics import Metrics
from .shipping import ABORT_EXIT_CODE, StoreLike, abort_key, heartbeat_key, summary_key
from .summary import Heartbeat, StepSummary


def process_exited(pid: int) -> bool:
    """True when `pid` (on this host) is gone or a zombie. False when unsure."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def _exit_process(event: AnomalyEvent) -> None:
    print(
        f"elastickit.monitor: hang at {event.op} (group {event.group}, seq {event.seq}); "
        f"ranks {list(event.ranks)} never entered it; aborting the job",
        flush=True,
    )
    os._exit(ABORT_EXIT_CODE)


class Collector:
    """Gathers summaries and heartbeats of `world_size` ranks from `store` and detects.

    Call order: `start()` (background thread, polls every `poll_s`) or `poll_once()` from
    your own loop (tests), then `close()`. `events` holds every finding so far.
    """

    def __init__(
        self,
        store: StoreLike,
        *,
        world_size: int,
        prefix: str = "ekmon",
        events_path: str | None = None,
        ranks_path: str | None = None,
        ranks_tags: Mapping[int, Mapping[str, Any]] | None = None,
        config: DetectorConfig | None = None,
        poll_s: float = 0.1,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        abort_on_hang: bool = False,
        on_abort: Callable[[AnomalyEvent], None] | None = _exit_process,
        on_event: Callable[[AnomalyEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.world_size = world_size
        self.prefix = prefix
        self.events_path = events_path
        self.config = config or DetectorConfig()
        self.poll_s = poll_s
        self.abort_on_hang = abort_on_hang
        self.on_abort = on_abort
        self.on_event = on_event
        self.clock = clock
        self.events: list[AnomalyEvent] = []
        self.errors = 0
        self._host = socket.gethostname()
        keep = max(3 * self.config.window_steps, 8)
        self._summaries: dict[int, collections.deque[StepSummary]] = {
            r: collections.deque(maxlen=keep) for r in range(world_size)
        }
        self._next = [0] * world_size
        self._beats: dict[int, Heartbeat] = {}
        self._changed_at: dict[int, float] = {}
        self._seen: set[tuple[str, tuple[int, ...]]] = set()
        self._aborted = False  # after an abort, ranks exiting is our doing, not a crash
        self._ended = False  # every rank finished the job: ranks exiting is the end, not a crash
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file = None
        if events_path:
            os.makedirs(os.path.dirname(os.path.abspath(events_path)), exist_ok=True)
            self._file = open(events_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._ranks_file = None
        # Each rank's extra fields as a JSON fragment spliced into its lines: `,"gen":2,...`.
        self._tags = {
            r: "," + json.dumps(dict(t), separators=(",", ":"))[1:-1]
            for r, t in (ranks_tags or {}).items()
            if t
        }
        if ranks_path:
            os.makedirs(os.path.dirname(os.path.abspath(ranks_path)), exist_ok=True)
            self._ranks_file = open(ranks_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.metrics = (
            Metrics(port=metrics_port, host=metrics_host) if metrics_port is not None else None
        )

    @property
    def metrics_port(self) -> int | None:
        """The port the Prometheus endpoint listens on, or None when metrics are off."""
        return self.metrics.port if self.metrics is not None else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ekmon-collector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the collector must not die on a bad read
                self.errors += 1
            self._stop.wait(self.poll_s)

    def _read(self) -> None:
        now = self.clock()
        recorded: list[str] = []
        for r in range(self.world_size):
            key = heartbeat_key(self.prefix, r)
            try:
                if self.store.check([key]):
                    hb = Heartbeat.from_json(self.store.get(key))
                    old = self._beats.get(r)
                    if old is None or old.beat != hb.beat or old.pid != hb.pid:
                        self._changed_at[r] = now
                    self._beats[r] = hb
            except Exception:  # noqa: BLE001
                self.errors += 1
            for _ in range(64):
                key = summary_key(self.prefix, r, self._next[r])
                try:
                    if not self.store.check([key]):
                        break
                    summary = StepSummary.from_json(self.store.get(key))
                    line = summary.to_json()
                    tag = self._tags.get(r)
                    recorded.append(line[:-1] + tag + "}" if tag else line)
                    if self._next[r] >= self.config.warmup_steps:
                        self._summaries[r].append(summary)
                except Exception:  # noqa: BLE001
                    self.errors += 1
                    break
                self._next[r] += 1
                try:
                    self.store.delete_key(key)  # type: ignore[attr-defined]
                except Exception:  # noqa: BLE001 - a store without delete keeps the key
                    pass
        if recorded and self._ranks_file is not None:
            # Advisory, like the metrics: written (not fsynced) once per poll, never raised.
            try:
                self._ranks_file.write("".join(line + "\n" for line in recorded))
                self._ranks_file.flush()
            except OSError:
                self.errors += 1

    def observed(self) -> dict[int, ObservedHeartbeat]:
        now = self.clock()
        out = {}
        for r, hb in self._beats.items():
            exited = hb.host == self._host and hb.state != "closed" and process_exited(hb.pid)
            out[r] = ObservedHeartbeat(
                heartbeat=hb, silent_s=now - self._changed_at[r], exited=exited
            )
        return out

    def poll_once(self) -> list[AnomalyEvent]:
        """Read the store, run the detector, report new findings; return them."""
        self._read()
        beats = self.observed()
        found = detect(
            self._summaries,
            beats,
            world_size=self.world_size,
            now_s=time.time(),
            config=self.config,
        )
        new = [
            e
            for e in found
            if e.key not in self._seen and not ((self._aborted or self._ended) and e.type == "crash")
        ]
        for e in new:
            self._seen.add(e.key)
            self.events.append(e)
            if self._file is not None:
                self._file.write(e.to_json() + "\n")
                self._file.flush()
                os.fsync(self._file.fileno())
            if self.on_event is not None:
                try:
                    self.on_event(e)
                except Exception:  # noqa: BLE001
                    self.errors += 1
        if self.metrics is not None:
            steps = complete_steps(self._summaries, self.world_size, self.config.window_steps)
            last = {r: d[-1] for r, d in self._summaries.items() if d}
            self.metrics.update(
                last, straggler_scores(steps), {r: o.silent_s for r, o in beats.items()}
            )
            self.metrics.count(new)
        hangs = [e for e in new if e.type == "hang"]
        if hangs and self.abort_on_hang:
            self._abort(hangs[0])
        return new

    def _abort(self, event: AnomalyEvent) -> None:
        self._aborted = True
        try:
            self.store.set(
                abort_key(self.prefix),
                json.dumps(
                    {
                        "reason": f"hang at {event.op} seq {event.seq} in group {event.group}; "
                        f"ranks {list(event.ranks)} never entered",
                        "event": event.to_dict(),
                    }
                ),
            )
        except Exception:  # noqa: BLE001 - still abort this process
            self.errors += 1
        if self.on_abort is not None:
            self.on_abort(event)

    def settled(self) -> bool:
        """Every rank that sent a heartbeat has closed cleanly or been reported crashed."""
        crashed = {r for e in self.events if e.type == "crash" for r in e.ranks}
        return all(hb.state == "closed" or r in crashed for r, hb in self._beats.items())

    def stop_polling(self) -> None:
        """Stop the background polls; `close()` still reads what is left. A job about to end
        calls it before its last barrier, so that no poll runs while the ranks leave."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def close(self, *, final_wait_s: float | None = None, ended: bool = False) -> None:
        """Stop polling; first give ranks still running up to `final_wait_s` (default: the
        crash silence bound) to close or be found crashed, so a crash that brings the job
        down is still reported.

        `ended`: every rank finished the job (each closed its reporter, then all met in a
        barrier), so their last summaries are in the store: one last read, and a rank seen
        leaving now is not a crash (its goodbye can lose the race with its exit)."""
        self.stop_polling()
        self._ended = ended
        wait = (
            self.config.crash_silence_s + 2 * self.poll_s if final_wait_s is None else final_wait_s
        )
        deadline = self.clock() + wait
        while True:
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001
                self.errors += 1
            if ended or self.settled() or self.clock() >= deadline:
                break
            time.sleep(self.poll_s)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._ranks_file is not None:
            self._ranks_file.close()
            self._ranks_file = None
        if self.metrics is not None:
            self.metrics.close()
