"""An injected crash is logged at the step it announces (`crash:rank=R:step=S` -> the monitor's
crash event says step S), even when the rank's last periodic heartbeat named the step before."""

from __future__ import annotations

import json
import os

import pytest
from elastickit.monitor import register_backend

from tests._dist import RankError, run_ranks

BACKEND = register_backend()

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]


def _job(rank: int, world_size: int, events_path: str) -> int:
    import time

    from elastickit.faults import build_step_hooks

    hooks = build_step_hooks(["crash:rank=1:step=3"], events_path, rank, world_size)
    try:
        for step in (1, 2):
            for h in hooks:
                h.on_step_start(step)
            for h in hooks:
                h.on_step_end(step, 0.0, 0.01)
        if rank == 1:
            # Longer than the heartbeat interval (0.2 s): the last heartbeat says step 2.
            time.sleep(0.6)
            for h in hooks:
                h.on_step_start(3)  # crashes here
            raise AssertionError("the crash did not happen")
        deadline = time.monotonic() + 30  # rank 0 runs the collector: wait for its finding
        while time.monotonic() < deadline:
            if os.path.exists(events_path):
                with open(events_path) as f:
                    if '"crash"' in f.read():
                        break
            time.sleep(0.05)
    finally:
        if rank == 0:
            for h in hooks:
                h.close()
    return 0


def test_crash_event_names_the_announced_step(tmp_path) -> None:
    path = str(tmp_path / "events.jsonl")
    with pytest.raises(RankError, match="rank 1"):
        run_ranks(
            _job, world_size=2, args=(path,), timeout_s=90, backend=BACKEND, error_grace_s=40.0
        )
    with open(path) as f:
        crashes = [e for e in map(json.loads, f) if e["type"] == "crash"]
    assert [(e["ranks"], e["step"]) for e in crashes] == [([1], 3)], crashes
