"""The checkpoint event log: JSON lines under the root, read by the monitor and the dashboard."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

log = logging.getLogger("elastickit")

#: Records kept in memory while the log cannot be written (a full, read-only or vanished disk).
MAX_PENDING = 10_000


def _ends_torn(path: str) -> bool:
    """Whether the log's last line lacks its newline (a writer died, or a disk filled, mid-line)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


class EventLog:
    """Appends one JSON object per line to `path`; thread-safe; never raises into training.

    A record that cannot be written (the disk is full, read-only, or the directory is gone) is
    kept in memory, in order, and written with the next one that can be (or by `flush`): the log
    records a full disk's failures once there is room again. A line torn by a writer that died
    mid-write (or by a disk that filled mid-line) stays alone on its line: the next record starts
    on a fresh one, so that only the torn record is lost (and rewritten whole if it was ours).

    `requires`: a file that must exist for the log to be written (the root's lock file): when
    the root is unmounted, its empty mount point must not receive a new log.
    """

    def __init__(self, path: str | None, *, requires: str | None = None) -> None:
        self.path = path
        self.requires = requires
        self._lock = threading.Lock()
        self._check_tail = True  # look for a torn last line before the first append
        self._pending: list[bytes] = []
        self._dropped = 0
        self._warned = False
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        record = {"type": type, "time": time.time(), **fields}
        if self.path:
            line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
            with self._lock:
                self._pending.append(line)
                if len(self._pending) > MAX_PENDING:
                    self._dropped += len(self._pending) - MAX_PENDING
                    del self._pending[: len(self._pending) - MAX_PENDING]
                self._write_pending()
        return record

    def flush(self) -> bool:
        """Try to write the records kept in memory; True when none is left."""
        if not self.path:
            return True
        with self._lock:
            self._write_pending()
            return not self._pending

    def _write_pending(self) -> None:
        assert self.path is not None
        if self.requires is not None and not os.path.exists(self.requires):
            self._failed(f"{self.requires} is gone (the directory was deleted, moved or unmounted)")
            return
        try:
            prefix = b"\n" if self._check_tail and _ends_torn(self.path) else b""
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            self._failed(e.strerror or str(e))
            return
        data = prefix + b"".join(self._pending)
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as e:
            self._failed(e.strerror or str(e))
        finally:
            os.close(fd)
        # Whole records written leave the queue; a record cut short is written whole next time.
        end = len(prefix)
        done = 0
        for line in self._pending:
            end += len(line)
            if end > written:
                break
            done += 1
        del self._pending[:done]
        self._check_tail = bool(self._pending)
        if not self._pending and self._warned:
            self._warned = False
            lost = f"; {self._dropped} older record(s) were dropped" if self._dropped else ""
            log.warning("elastickit: the event log %s is written again%s", self.path, lost)
            self._dropped = 0

    def _failed(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "elastickit: cannot append to the event log %s (%s); keeping its records in memory "
                "until it can",
                self.path,
                why,
            )


def read_events(path: str) -> list[dict[str, Any]]:
    """Every record of an event log (an absent log has none; a torn line is skipped)."""
    out = []
    try:
        # Records are ASCII (json.dumps escapes the rest); a damaged byte spoils its line only.
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out
