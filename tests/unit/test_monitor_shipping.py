"""Reporter -> store -> collector, on an in-memory store (no process group): summaries and
heartbeats arrive, events are written as JSON lines, metrics are served, hangs abort."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from elastickit.monitor import Collector, DetectorConfig, Heartbeat, InFlightOp, Reporter
from elastickit.monitor.records import RingBuffer
from elastickit.monitor.shipping import abort_key, heartbeat_key

pytestmark = pytest.mark.timeout(60)


class MemStore:
    """The StoreLike subset, in memory."""

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


def _one_step(buf: RingBuffer, wait_s: float, seq: int) -> None:
    now = time.time()
    p = buf.enter("allreduce", "0", (0, 1), -1, 64, seq, now - wait_s)
    buf.complete(p, now, True)


def test_summaries_flow_and_clean_close_is_not_a_crash(tmp_path) -> None:
    store = MemStore()
    bufs = [RingBuffer(), RingBuffer()]
    reps = [
        Reporter(store, rank=r, buffer=bufs[r], interval_s=0.02, on_abort=None) for r in range(2)
    ]
    events_path = str(tmp_path / "ev" / "events.jsonl")
    col = Collector(
        store,
        world_size=2,
        events_path=events_path,
        poll_s=0.02,
        config=DetectorConfig(window_steps=3, min_hits=3, warmup_steps=1),
        on_abort=None,
    )
    for rep in reps:
        rep.start()
    for step in range(4):
        for r, rep in enumerate(reps):
            rep.step_start(step)
            _one_step(bufs[r], 0.001 if r == 1 else 0.05, step + 1)  # rank 1 arrives last
            rep.step_end(step, 0.1)
    for rep in reps:
        rep.close()
    col.close(final_wait_s=0.5)
    assert [e.type for e in col.events] == ["slow_rank"]
    assert col.events[0].ranks == (1,)
    with open(events_path) as f:
        lines = [json.loads(x) for x in f]
    assert lines[0]["type"] == "slow_rank" and lines[0]["ranks"] == [1]
    assert col.settled()
    assert not any(k.startswith("ekmon/s/") for k in store.data)  # consumed summaries deleted


def test_silent_rank_is_reported_as_crash() -> None:
    store = MemStore()
    clock = [100.0]
    col = Collector(
        store,
        world_size=2,
        poll_s=0.01,
        clock=lambda: clock[0],
        on_abort=None,
        config=DetectorConfig(crash_silence_s=1.0),
    )
    for r in range(2):
        store.set(
            heartbeat_key("ekmon", r),
            Heartbeat(rank=r, pid=1, host="elsewhere", beat=1, time_s=0.0, step=3).to_json(),
        )
    assert col.poll_once() == []
    clock[0] += 0.5
    store.set(
        heartbeat_key("ekmon", 0),
        Heartbeat(rank=0, pid=1, host="elsewhere", beat=2, time_s=0.0, step=4).to_json(),
    )
    assert col.poll_once() == []
    clock[0] += 0.7  # rank 1 silent for 1.2 s, rank 0 for 0.7 s
    new = col.poll_once()
    assert [(e.type, e.ranks) for e in new] == [("crash", (1,))]
    assert col.poll_once() == []  # reported once


def test_a_rank_leaving_after_the_job_ended_is_no_crash() -> None:
    """A job that ended (every reporter closed, then a barrier) tells the collector so: a rank
    whose goodbye lost the race with its exit is not reported as crashed, while the same exit
    without `ended` is (the elastic demo's dashboard once showed two such false crashes)."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # a process of this host that has exited
    for ended, want in ((True, []), (False, [("crash", (1,))])):
        store = MemStore()
        col = Collector(store, world_size=2, poll_s=0.01, on_abort=None)
        for r in range(2):
            store.set(heartbeat_key("ekmon", r), Heartbeat(
                rank=r, pid=pid, host=socket.gethostname(), beat=1, time_s=0.0, step=9,
                state="closed" if r == 0 else "running").to_json())
        col.stop_polling()
        col.close(final_wait_s=0.05, ended=ended)
        assert [(e.type, e.ranks) for e in col.events] == want


def test_hang_aborts_through_the_store_and_metrics_are_served() -> None:
    store = MemStore()
    aborted: list = []
    col = Collector(
        store,
        world_size=2,
        poll_s=0.01,
        metrics_port=0,
        abort_on_hang=True,
        on_abort=aborted.append,
        config=DetectorConfig(hang_initial_s=0.5),
    )
    try:
        waiting = Heartbeat(
            rank=0,
            pid=1,
            host="elsewhere",
            beat=1,
            time_s=0.0,
            step=2,
            in_flight=(
                InFlightOp(op="allreduce", group="0", ranks=(0, 1), peer=-1, seq=7, age_s=3.0),
            ),
            entered=(("0", 7),),
        )
        stuck = Heartbeat(
            rank=1, pid=2, host="elsewhere", beat=1, time_s=0.0, step=2, entered=(("0", 6),)
        )
        store.set(heartbeat_key("ekmon", 0), waiting.to_json())
        store.set(heartbeat_key("ekmon", 1), stuck.to_json())
        new = col.poll_once()
        assert [(e.type, e.ranks, e.seq) for e in new] == [("hang", (1,), 7)]
        assert aborted and aborted[0].ranks == (1,)
        assert "never entered" in json.loads(store.get(abort_key("ekmon")))["reason"]
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{col.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        assert 'ekmon_events_total{type="hang"} 1.0' in body
    finally:
        col.close(final_wait_s=0)

    # A reporter that sees the abort key calls its on_abort with the reason.
    reasons: list[str] = []
    rep = Reporter(store, rank=1, buffer=RingBuffer(), interval_s=0.01, on_abort=reasons.append)
    rep.start()
    deadline = time.monotonic() + 5
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.01)
    rep.close()
    assert reasons and "hang at allreduce" in reasons[0]


def test_reporter_survives_a_broken_store() -> None:
    class Broken(MemStore):
        def set(self, key: str, value: str | bytes) -> None:
            raise RuntimeError("store down")

    buf = RingBuffer()
    rep = Reporter(Broken(), rank=0, buffer=buf, interval_s=0.01, on_abort=None)
    rep.start()
    _one_step(buf, 0.01, 1)
    rep.step_end(0, 0.1)  # must not raise
    rep.close()
    assert rep.errors > 0


def test_ring_buffer_is_bounded() -> None:
    buf = RingBuffer(capacity=3, max_in_flight=2)
    pending = [buf.enter("send", "0", (0, 1), 1, 4, i + 1, 0.0) for i in range(3)]
    assert [r.seq for r in buf.in_flight()] == [2, 3]  # the oldest was forgotten
    for p in pending[1:]:
        buf.complete(p, 1.0, True)
    for i in range(3):
        buf.complete(buf.enter("allreduce", "0", (0, 1), -1, 4, i + 1, 0.0), 1.0, True)
    assert [r.op for r in buf.drain()] == ["allreduce"] * 3
    assert buf.dropped == 3
    assert buf.drain() == []


def test_ranks_lines_carry_each_ranks_tags_and_the_newest_op_in_flight_is_known(tmp_path) -> None:
    from elastickit.monitor import StepSummary
    from elastickit.monitor.shipping import summary_key

    store = MemStore()
    path = tmp_path / "ranks.jsonl"
    tags = {0: {"gen": 3, "node": "0", "member": "0.0.h.1"}, 1: {"gen": 3, "node": "2", "member": "2.0.h.7"}}
    col = Collector(store, world_size=2, ranks_path=str(path), ranks_tags=tags, poll_s=0.01, on_abort=None)
    for rank in range(2):
        s = StepSummary(rank=rank, step=5, time_s=1.0, step_time_s=0.1, wait_s=0.0, num_ops=1)
        store.set(summary_key("ekmon", rank, 0), s.to_json())
    col.poll_once()
    col.close(final_wait_s=0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert {(d["rank"], d["gen"], d["node"], d["member"]) for d in lines} == {(0, 3, "0", "0.0.h.1"), (1, 3, "2", "2.0.h.7")}
    assert all(StepSummary.from_json(x).step == 5 for x in path.read_text().splitlines())  # still summaries

    buf = RingBuffer()
    assert buf.newest_in_flight() is None
    a = buf.enter("allreduce", "0", (0, 1), -1, 4, 1, 10.0)
    buf.enter("allreduce", "0", (0, 1), -1, 4, 2, 12.0)
    assert buf.newest_in_flight() == 12.0
    buf.complete(a, 13.0, True)
    assert buf.newest_in_flight() == 12.0
