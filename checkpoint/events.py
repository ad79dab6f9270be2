"""The checkpoint event log: JSON lines under the root, read by the monitor and the dashboard."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any


class EventLog:
    """Appends one JSON object per line to `path`; thread-safe; never raises into training."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def emit(self, type: str, **fields: Any) -> dict[str, Any]:
        record = {"type": type, "time": time.time(), **fields}
        if self.path:
            line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
            with self._lock:
                try:
                    with open(self.path, "a", encoding="utf-8") as f:
                        f.write(line)
                except OSError:
                    pass  # the log is advisory: a full disk must not stop training
        return record


def read_events(path: str) -> list[dict[str, Any]]:
    """Every record of an event log (an absent log has none; a torn last line is skipped)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out
