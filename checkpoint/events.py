"""The checkpoint event log: JSON lines under the root, read by the monitor and the dashboard."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any


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

    A line torn by a writer that died mid-write (or a full disk) stays alone on its line: the
    next record starts on a fresh one, so that only the torn record is lost, never the next.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._check_tail = True  # look for a torn last line before the first append
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        record = {"type": type, "time": time.time(), **fields}
        if self.path:
            line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
            with self._lock:
                try:
                    if self._check_tail:
                        if _ends_torn(self.path):
                            line = "\n" + line
                        self._check_tail = False
                    with open(self.path, "a", encoding="utf-8") as f:
                        f.write(line)
                except OSError:
                    self._check_tail = True  # a partial write may have torn the last line
        return record


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
