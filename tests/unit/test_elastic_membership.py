"""Membership through a real TCPStore (no process groups): one plan per generation whoever
proposes, a dead process and a silent heartbeat each make the next plan without the member,
injected faults are named, waiting members make the first rank want to grow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from elastickit.elastic.membership import Member, Membership, Plan

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    yield master


@pytest.fixture
def procs():
    """Real processes standing in for members (their pids are what the watchers check)."""
    started = []

    def new() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        started.append(p)
        return p

    yield new
    for p in started:
        p.kill()
        p.wait()


def planner(members, previous):
    ids = tuple(m.id for m in members)
    return f"pp=1,dp={len(ids)},tp=1", 1, ids, (), ""


def _member(store, node: int, pid: int, local_rank: int = 0, **kw) -> Membership:
    host = Member.this_process("0", 0).host
    me = Member(id=f"{node}.{local_rank}.host.{pid}", node=str(node), local_rank=local_rank, host=host, pid=pid)
    factory = lambda: dist.PrefixStore("ek/test", dist.TCPStore("127.0.0.1", store.port, is_master=False))
    m = Membership(factory, me, kw.pop("planner", planner), hang_s=kw.pop("hang_s", 0.5), form_s=0.5, poll_s=0.02, **kw)
    m.start()
    return m


def _silence(m: Membership) -> None:
    """Stop a member's watcher without a goodbye: it neither beats nor leaves."""
    m._stop.set()
    m._thread.join()


def _until(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_one_plan_per_generation_and_a_dead_process_is_left_out(store, procs):
    ps = [procs() for _ in range(3)]
    ms = [_member(store, j, p.pid) for j, p in enumerate(ps)]
    first = [m.first_plan(expected=3, timeout_s=10) for m in ms]
    assert len({f.to_json() for f in first}) == 1  # everyone adopted the same plan 1
    plan = first[0]
    assert plan.gen == 1 and plan.cause == "start" and plan.world_size == 3
    assert list(plan.active) == [m.me.id for m in ms]  # node order

    _silence(ms[2])
    ps[2].kill()
    ps[2].wait()
    _until(lambda: ms[0].latest.gen == 2 and ms[1].latest.gen == 2)
    nxt = ms[0].latest
    assert ms[1].latest == nxt
    assert nxt.cause == "crash" and nxt.failed == (ms[2].me.id,) and nxt.failed_ranks == (2,)
    assert nxt.failed_node == "2" and nxt.active == plan.active[:2] and nxt.prev_layout == "pp=1,dp=3,tp=1"
    for m in ms[:2]:
        m.leave()


def test_a_silent_heartbeat_is_a_hang_and_an_injected_fault_is_named(store, procs):
    ps = [procs() for _ in range(3)]
    ms = [_member(store, j, p.pid) for j, p in enumerate(ps)]
    plan = ms[0].first_plan(expected=3, timeout_s=10)
    _until(lambda: all(m.latest is not None for m in ms))
    for m in ms:
        m.set_state("training")  # the tight bound applies to members that train
    # The supervisor says it stopped node 1 (its process lives on, its heartbeat does not).
    dist.PrefixStore("ek/test", store).set("fault/1", json.dumps({"kind": "stopnode", "time": time.time()}))
    t0 = time.time()
    _silence(ms[1])
    _until(lambda: ms[0].latest.gen == 2)
    nxt = ms[0].latest
    assert nxt.cause == "stopnode" and nxt.failed == (ms[1].me.id,)
    assert t0 - 1 < nxt.fault_time <= nxt.detected_at
    assert nxt.detected_at - t0 >= 0.4  # it waited for the silence bound, not less
    assert plan.gen == 1
    for m in (ms[0], ms[2]):
        m.leave()


@pytest.mark.parametrize("sibling", ["dying", "alive"])
def test_a_failed_members_node_siblings_go_with_it_unless_they_beat_on(store, procs, sibling):
    """Node 1 runs two workers; its first one is seen exited. Its sibling, still counted alive
    (heartbeat within the bound, process not yet gone: killed a moment later, as a node's
    workers are), goes with it unless it beats on."""
    ps = [procs() for _ in range(3)]
    ms = [_member(store, 0, ps[0].pid, hang_s=5.0), _member(store, 1, ps[1].pid, 0, hang_s=5.0),
          _member(store, 1, ps[2].pid, 1, hang_s=5.0)]
    plan = ms[0].first_plan(expected=3, timeout_s=10)
    _until(lambda: all(m.latest is not None for m in ms))
    for m in ms:
        m.set_state("training")
    _silence(ms[0])  # this test proposes for node 0 by hand
    _silence(ms[1])
    if sibling == "dying":
        _silence(ms[2])  # its process lives, its heartbeat stopped: it is being killed
    # (silenced before the kill: its watcher would otherwise see node 1's first worker exit and
    # propose the plan itself, without itself among the failed)
    ps[1].kill()
    ps[1].wait()
    assert ms[0].alive(ms[2].me.id)  # counted alive when the proposal starts
    nxt = ms[0].propose(plan, failed=[ms[1].me.id])
    if sibling == "dying":
        assert nxt.failed == (ms[1].me.id, ms[2].me.id) and nxt.failed_ranks == (1, 2)
        assert nxt.active == (ms[0].me.id,) and nxt.cause == "crash"
    else:
        assert nxt.failed == (ms[1].me.id,) and nxt.failed_ranks == (1,)
        assert nxt.active == (ms[0].me.id, ms[2].me.id)
        ms[2].leave()


def test_a_clean_exit_is_no_failure(store, procs):
    ps = [procs() for _ in range(2)]
    ms = [_member(store, j, p.pid) for j, p in enumerate(ps)]
    ms[0].first_plan(expected=2, timeout_s=10)
    _until(lambda: all(m.latest is not None for m in ms))
    ms[1].finish({"step": 5})
    ms[1].leave()
    time.sleep(0.8)
    assert ms[0].latest.gen == 1 and ms[0].done == {"step": 5}
    ms[0].leave()


def test_waiting_members_make_the_first_rank_want_to_grow_and_a_paused_plan_resumes(store, procs):
    def small(members, previous):  # at most 2 ranks when only node 0 is there; 3 otherwise
        ids = tuple(m.id for m in members)
        if len(ids) < 2:
            return "", 0, (), ids, "no layout fits 1 rank"
        return f"pp=1,dp={len(ids)},tp=1", 1, ids, (), ""

    ps = [procs() for _ in range(3)]
    a = _member(store, 0, ps[0].pid, planner=small)
    paused = a.propose(None)
    assert paused.active == () and paused.reason == "no layout fits 1 rank"
    b = _member(store, 1, ps[1].pid, planner=small)
    # A member arrived while paused: a watcher proposes again.
    _until(lambda: a.latest.gen == 2 and a.latest.world_size == 2)
    _until(lambda: b.latest is not None and b.latest.gen == 2)
    for m in (a, b):
        m.set_state("training")
    assert not a.grow_pending
    c = _member(store, 2, ps[2].pid, planner=small)
    _until(lambda: a.grow_pending)  # rank 0 of the plan sees a larger layout
    assert not b.grow_pending  # only the first rank decides
    grown = a.propose(a.latest, cause="join", step=7)
    assert grown.cause == "join" and grown.joined == (c.me.id,) and grown.step == 7 and grown.world_size == 3
    for m in (a, b, c):
        m.leave()


def test_silence_bound_stretches_under_load_but_not_forever(store, procs):
    m = _member(store, 0, procs().pid, hang_s=1.0)
    m._states["x"] = "training"
    assert m.silence_bound("x") == 1.0
    m._gaps["x"] = __import__("collections").deque([0.05, 0.8])
    assert m.silence_bound("x") == pytest.approx(2.0)
    m._gaps["x"].append(9.0)
    assert m.silence_bound("x") == 5.0
    m._states["x"] = "forming"
    assert m.silence_bound("x") == 5.0  # form_s (0.5 here) does not shorten it
    m.leave()


def test_plan_json_round_trip():
    p = Plan(gen=3, active=("a", "b"), layout="pp=1,dp=2,tp=1", grad_accum=6, failed=("c",), failed_ranks=(2,))
    assert Plan.from_json(p.to_json()) == p
    assert p.rank_of("b") == 1 and p.rank_of("c") is None


def test_a_silent_peer_is_not_hung_while_training_moves(store, procs):
    progress = {"since": 0.0}
    ps = [procs() for _ in range(2)]
    a = _member(store, 0, ps[0].pid, progress_s=lambda: progress["since"])
    b = _member(store, 1, ps[1].pid)
    a.first_plan(expected=2, timeout_s=10)
    _until(lambda: b.latest is not None)
    for m in (a, b):
        m.set_state("training")
    _silence(b)  # b's heartbeat thread starves, but a's steps still complete: b takes part
    time.sleep(1.5)
    assert a.latest.gen == 1
    progress["since"] = 5.0  # a's training is stuck too: b is hung
    _until(lambda: a.latest.gen == 2)
    assert a.latest.cause == "hang" and a.latest.failed == (b.me.id,)
    a.leave()


def test_a_stuck_loop_is_left_out_while_its_peers_wait_and_never_counted_alive_again(store, procs):
    from elastickit.elastic.progress import Progress

    # Each member's loop as the runtime would report it: (counter, blocked since | None).
    loops = {j: {"counter": 0, "blocked_at": None} for j in range(3)}

    def progress(j):
        def now():
            loop = loops[j]
            at = loop["blocked_at"]
            plan = ms[j].latest if len(ms) > j else None
            return Progress(counter=str(loop["counter"]), blocked=at is not None, gen=plan.gen if plan else 0), (
                None if at is None else time.monotonic() - at
            )
        return now

    ps = [procs() for _ in range(3)]
    ms: list[Membership] = []
    for j, p in enumerate(ps):
        ms.append(_member(store, j, p.pid, progress=progress(j), hang_s=0.4))
    ms[0].first_plan(expected=3, timeout_s=10)
    _until(lambda: all(m.latest is not None for m in ms))
    for m in ms:
        m.set_state("training")
    for _ in range(5):  # everyone makes progress for a while
        for loop in loops.values():
            loop["counter"] += 1
        time.sleep(0.05)
    # Every loop blocked in the same collective: nobody is to blame among them.
    for loop in loops.values():
        loop["blocked_at"] = time.monotonic()
    time.sleep(1.2)
    assert ms[0].latest.gen == 1, ms[0].latest
    # Member 1's loop stops outside any collective (its heartbeat goes on); 0 and 2 wait on it.
    loops[1]["blocked_at"] = None
    t0 = time.monotonic()
    _until(lambda: ms[0].latest.gen == 2)
    nxt = ms[0].latest
    assert nxt.cause == "hang" and nxt.failed == (ms[1].me.id,) and nxt.stuck == (ms[1].me.id,)
    assert nxt.failed_ranks == (1,) and nxt.active == (ms[0].me.id, ms[2].me.id)
    assert time.monotonic() - t0 < 3.0
    # Its heartbeat still beats, yet it is not alive to the others: the job never grows onto it.
    time.sleep(0.3)
    assert ms[1].me.id not in ms[0].alive_members() and not ms[0].grow_pending
    for m in ms:
        m.leave()


def test_a_slow_peer_that_keeps_moving_is_not_stuck():
    from elastickit.elastic.progress import Progress, ProgressWatch

    w = ProgressWatch(hang_s=1.0)
    t = 100.0
    for i in range(6):  # moves every 0.6 s (a slow step)
        t += 0.6
        w.observe("b", Progress(counter=str(i), blocked=False), t)
    assert w.bound("b") == pytest.approx(1.5)  # 2.5x its longest gap
    assert not w.stuck("b", t + 1.2) and w.stuck("b", t + 1.6)
    w.observe("b", Progress(counter="5", blocked=True), t + 1.7)  # now waiting in a collective
    assert not w.stuck("b", t + 3.0)
    w.observe("c", Progress(counter="0", blocked=False), t)  # never moved since first seen
    assert not w.stuck("c", t + 10)
    w.observe("d", Progress(counter="0", blocked=False, training=False), t)
    w.observe("d", Progress(counter="1", blocked=False, training=False), t + 0.1)
    assert not w.stuck("d", t + 10)  # forming or a spare: never judged
    assert Progress.decode(Progress(counter="3:17:4", blocked=True, gen=3).encode()) == Progress(
        counter="3:17:4", blocked=True, gen=3
    )
    # A loop woken out of a superseded plan's collective (blocked -> not) moved: not stuck.
    w.observe("e", Progress(counter="0", gen=1), t)
    w.observe("e", Progress(counter="1", gen=1, blocked=True), t + 0.1)
    w.observe("e", Progress(counter="1", gen=1, blocked=False), t + 5)
    assert not w.stuck("e", t + 5.5) and not w.stuck("e", t + 20, gen=2)
