"""The live side: the collector records every rank's step summaries (ranks.jsonl), and the
dashboard reads each rank's heartbeat from a real TCPStore without consuming anything."""

from __future__ import annotations

import datetime
import json

import pytest
from elastickit.dashboard.store import StoreView, connect
from elastickit.monitor import Collector, Heartbeat, InFlightOp, StepSummary
from elastickit.monitor.shipping import heartbeat_key, summary_key

pytestmark = pytest.mark.timeout(60)


class MemStore:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str | bytes) -> None:
        self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def delete_key(self, key: str) -> bool:
        return self.data.pop(key, None) is not None


def _summary(rank: int, step: int) -> StepSummary:
    return StepSummary(rank=rank, step=step, time_s=100.0 + step, step_time_s=0.1, wait_s=0.01 * rank,
                       num_ops=2)


def test_the_collector_records_every_summary_it_reads(tmp_path) -> None:
    store = MemStore()
    path = tmp_path / "run" / "ranks.jsonl"
    col = Collector(store, world_size=2, ranks_path=str(path), poll_s=0.01, on_abort=None)
    for step in range(3):
        for rank in range(2):
            store.set(summary_key("ekmon", rank, step), _summary(rank, step).to_json())
    col.poll_once()
    col.close(final_wait_s=0)
    lines = [StepSummary.from_json(x) for x in path.read_text().splitlines()]
    # Warm-up steps too (the detector skips them, the heatmap shows them).
    assert sorted((s.rank, s.step) for s in lines) == [(r, s) for r in range(2) for s in range(3)]
    assert lines[0] == _summary(0, 0)


def test_no_ranks_path_no_file(tmp_path) -> None:
    store = MemStore()
    store.set(summary_key("ekmon", 0, 0), _summary(0, 0).to_json())
    col = Collector(store, world_size=1, poll_s=0.01, on_abort=None)
    col.poll_once()
    col.close(final_wait_s=0)
    assert list(tmp_path.iterdir()) == []


def _beat(rank: int, beat: int, step: int, state: str = "running") -> str:
    return Heartbeat(rank=rank, pid=1000 + rank, host="node-a", beat=beat, time_s=1.0, step=step,
                     state=state, in_flight=(InFlightOp(op="allreduce", group="0", ranks=(0, 1), peer=-1,
                                                        seq=7, age_s=0.5),) if rank == 1 else ()).to_json()


def test_store_view_reports_heartbeats_and_their_silence() -> None:
    store = MemStore()
    clock = [10.0]
    view = StoreView(store, prefix="ekmon", clock=lambda: clock[0])
    store.set(heartbeat_key("ekmon", 0), _beat(0, 1, 5))
    store.set(heartbeat_key("ekmon", 1), _beat(1, 1, 5))
    store.set(summary_key("ekmon", 0, 0), "{}")
    rows = view.ranks()
    assert [(r["rank"], r["step"], r["silent_s"]) for r in rows] == [(0, 5, 0.0), (1, 5, 0.0)]
    assert rows[1]["in_flight"] == [{"op": "allreduce", "group": "0", "seq": 7, "age_s": 0.5}]
    clock[0] = 13.0
    store.set(heartbeat_key("ekmon", 0), _beat(0, 2, 6))  # rank 0 beats on, rank 1 went silent
    rows = view.ranks()
    assert [(r["rank"], r["step"], r["silent_s"]) for r in rows] == [(0, 6, 0.0), (1, 5, 3.0)]
    assert summary_key("ekmon", 0, 0) in store.data  # never takes the collector's keys away


def test_connect_finds_the_monitor_in_a_real_tcpstore() -> None:
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    # As under torchrun: the default group's store prefixes keys with "default_pg/0//".
    master.set("default_pg/0//ekmon/hb/0", _beat(0, 3, 9))
    master.set("default_pg/0//ekmon/hb/1", _beat(1, 3, 9, state="closed"))
    view = connect(f"127.0.0.1:{master.port}")
    assert view.prefix == "default_pg/0//ekmon"
    rows = view.ranks()
    assert [(r["rank"], r["step"], r["state"], r["reachable"]) for r in rows] == [
        (0, 9, "running", True), (1, 9, "closed", True)]
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        connect("localhost")
    empty = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    with pytest.raises(ValueError, match="no monitor heartbeats"):
        connect(f"127.0.0.1:{empty.port}")
    assert json.loads(master.get("default_pg/0//ekmon/hb/0"))["beat"] == 3
