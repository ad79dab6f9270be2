"""The small parts of elastic recovery: waking a blocked store/gloo wait by shutting the
generation's connections (never a listener), the recovery record's phases, the run directory's
schemas, and the flags checked before a launch."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from elastickit.checkpoint.errors import RequestError

from elastickit.elastic.membership import Plan
from elastickit.elastic.rundir import (
    NodeRecord,
    RunDir,
    StepRecord,
    read_nodes,
    read_recoveries,
    read_steps,
)
from elastickit.elastic.record import recovery_record
from elastickit.elastic.sockets import SocketTracker

pytestmark = pytest.mark.timeout(60)


def test_shutdown_wakes_a_blocked_wait_on_a_connection_the_generation_opened():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    old = dist.TCPStore("127.0.0.1", master.port, is_master=False)  # before: never touched
    tracker = SocketTracker()
    tracker.start()
    client = dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=30))
    listener = socket.create_server(("127.0.0.1", 0))  # like gloo's: must survive
    shut: list[int] = []
    threading.Timer(0.5, lambda: shut.append(tracker.shutdown())).start()
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - the store's network error type varies by version
        client.wait(["never-set"])
    assert time.monotonic() - t0 < 10  # woken, not timed out after 30 s
    assert shut and shut[0] >= 1
    old.set("k", "v")  # the long-lived client still works
    assert old.get("k") == b"v"
    with socket.create_connection(listener.getsockname(), timeout=2):
        pass  # the listener still accepts
    listener.close()


def _listeners(port: int) -> list[int]:
    """Address families of this process's listening sockets on `port`."""
    from elastickit.elastic.sockets import open_sockets

    out = []
    for fd in open_sockets():
        try:
            sk = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sk.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and sk.getsockname()[1] == port:
                out.append(sk.family)
        except OSError:
            pass
        finally:
            sk.detach()
    return out


def test_the_rendezvous_store_listens_on_ipv4_for_an_ipv4_address():
    # An IPv4 peer of a dual-stack listener is ::ffff:a.b.c.d, which c10d's server looks up in
    # DNS on every accept (in its event loop); on an IPv4 socket the peer is a.b.c.d.
    from elastickit.elastic.store import master_store

    store = master_store("127.0.0.1", 0)
    assert _listeners(store.port) == [socket.AF_INET]
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=10))
    client.set("k", "v")
    assert store.get("k") == b"v"
    assert client.clone().get("k") == b"v"


def _plan(**kw) -> Plan:
    base = dict(gen=2, active=("a", "b"), layout="pp=1,dp=2,tp=1", grad_accum=6, cause="killnode",
                failed=("c",), failed_ranks=(2,), failed_node="2", fault_time=100.0, detected_at=100.1,
                prev_layout="pp=1,dp=3,tp=1", prev_world=3)
    base.update(kw)
    return Plan(**base)


def test_recovery_record_phases_add_up_to_the_time_to_the_first_step():
    times = [
        {"aborted": 100.2, "formed": 100.25, "built": 100.3, "restored": 100.5, "first": 100.7, "last_step": 9,
         "restore": {"step": 8, "tier": "local", "bytes": 10}},
        {"aborted": 100.15, "formed": 100.24, "built": 100.35, "restored": 100.45, "first": 100.71, "last_step": 9,
         "restore": {"step": 8, "tier": "peer", "bytes": 20}},
    ]
    rec = recovery_record(_plan(), times)
    p = rec.phases
    assert p.detect_s == pytest.approx(0.1) and p.abort_s == pytest.approx(0.1)
    assert p.rendezvous_s == pytest.approx(0.05) and p.start_s == pytest.approx(0.1)
    assert p.restore_s == pytest.approx(0.15) and p.first_step_s == pytest.approx(0.2)
    assert p.total_s() == pytest.approx(0.7) == rec.extra["mttr_s"]
    assert rec.restore == {"tier": "peer", "step": 8, "bytes": 30}  # a buddy's file was needed
    assert rec.lost_steps == 1 and rec.node == 2 and rec.ranks == (2,)
    d = rec.to_dict()
    assert set(d) >= {"cause", "ranks", "node", "phases", "restore", "lost_steps", "old_layout", "new_layout", "world_size"}


def test_recovery_record_never_counts_backwards():
    # A survivor whose collective broke before the detector spoke aborted "before" detection.
    times = [{"aborted": 99.0, "formed": 100.3, "built": 100.4, "restored": 100.5, "first": 100.6,
              "restore": {"step": 3, "tier": "local", "bytes": 1}}]
    p = recovery_record(_plan(), times).phases
    assert min(p.detect_s, p.abort_s, p.rendezvous_s, p.start_s, p.restore_s, p.first_step_s) >= 0
    assert p.total_s() == pytest.approx(0.6)


def test_a_join_counts_from_the_agreed_step():
    plan = _plan(cause="join", failed=(), failed_ranks=(), failed_node=None, fault_time=None,
                 active=("a", "b", "3.0.h.1"), joined=("3.0.h.1",), detected_at=50.2)
    times = [{"voted": 50.0, "aborted": 50.3, "formed": 50.4, "built": 50.5, "restored": 50.6, "first": 50.8,
              "restore": {"step": 7, "tier": "local", "bytes": 1}},
             {"formed": 50.41, "built": 50.5, "restored": 50.6, "first": 50.8, "restore": {"step": 7, "tier": "peer", "bytes": 1}},
             {"voted": 50.01, "aborted": 50.3, "formed": 50.4, "built": 50.5, "restored": 50.6, "first": 50.8,
              "restore": {"step": 7, "tier": "local", "bytes": 1}}]
    rec = recovery_record(plan, times)
    assert rec.cause == "join" and rec.node == 3 and rec.ranks == (2,)
    assert rec.extra["mttr_s"] == pytest.approx(0.8)


def test_run_directory_files(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    rd.make()
    for step, loss in [(1, 3.0), (2, 2.5), (2, 2.4), (3, 2.0)]:  # step 2 replayed after a recovery
        rd.append_step(StepRecord(step=step, loss=loss, world_size=2, layout="pp=1,dp=2,tp=1", grad_accum=6,
                                  step_s=0.1, time=1.0, samples=((step - 1) * 24, step * 24)))
    rows = read_steps(rd.root)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.4), (3, 2.0)]  # the last line wins
    assert set(rows[0]) == {"step", "loss", "world_size", "layout", "grad_accum", "step_s", "time", "samples"}
    assert len(read_steps(rd.root, last_wins=False)) == 4
    rd.write_nodes([NodeRecord(node=1, pid=11, pgid=11, state="killed", workers=(12,)),
                    NodeRecord(node=0, pid=10, pgid=10, state="running")])
    assert read_nodes(rd.root) == [
        {"node": 0, "pid": 10, "pgid": 10, "state": "running", "workers": [], "local": ""},
        {"node": 1, "pid": 11, "pgid": 11, "state": "killed", "workers": [12], "local": ""},
    ]
    rec = recovery_record(_plan(), [{"first": 100.5, "restore": {"step": 1, "tier": "local", "bytes": 1}}])
    rd.emit_recovery(rec)
    got = read_recoveries(rd.events)
    assert len(got) == 1 and got[0]["type"] == "recovery" and got[0]["cause"] == "killnode"
    assert json.loads((tmp_path / "run" / "events.jsonl").read_text())["phases"]["detect_s"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crash:rank=1:step=3", "with --nodes, faults are whole nodes or a hung loop"),
        ("hang:node=1:step=3", "unexpected field 'node=1'"),
        ("hang:rank=4:step=3", "rank=4 is outside ranks 0..3"),
        ("hang:rank=1", "field 'step' is missing"),
        ("killnode:node=4:step=3", "node=4 is outside nodes 0..3"),
        ("killnode:node=1", "field 'step' is missing"),
        ("stopnode:node=1:step=0", "step must be at least 1"),
        ("killnode:node=x:step=2", "node='x' is not a whole number"),
    ],
)
def test_node_faults_are_checked(text, message):
    from elastickit.elastic.simulate import parse_node_fault

    with pytest.raises(RequestError, match=message):
        parse_node_fault(text, 4, 4)
    assert parse_node_fault("killnode:node=2:step=5", 4).node == 2
    hang = parse_node_fault("hang:rank=3:step=7", 2, 4)  # 2 nodes x 2 workers
    assert (hang.kind, hang.rank, hang.step) == ("hang", 3, 7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(min_nodes=3, max_nodes=2), "MIN:MAX"),
        (dict(rdzv_endpoint="nohost"), "not HOST:PORT"),
        (dict(rdzv_conf=(("is_host", "true"),)), "is_host is fixed to false"),
        (dict(nproc_per_node=0), "at least 1"),
    ],
)
def test_agent_requests_are_checked(kwargs, message):
    from elastickit.elastic.agent import AgentRequest

    base = dict(min_nodes=1, max_nodes=2, nproc_per_node=1, rdzv_endpoint="127.0.0.1:29500")
    with pytest.raises(RequestError, match=message):
        AgentRequest(**{**base, **kwargs}).check()
    ok = AgentRequest(**base)
    ok.check()
    assert ok.rdzv_configs()["is_host"] == "false" and ok.rdzv_configs()["last_call_timeout"] == "1"


def test_trainer_flags_are_checked_before_launch():
    from elastickit.elastic.worker import parse_flags

    for flags, message in [
        (["--run", "r", "--steps", "0"], "--steps must be positive"),
        (["--run", "r", "--stepz", "3"], "unknown trainer flag '--stepz'"),
        (["--steps", "3"], "--run is missing"),
        (["--run", "r", "--global-batch", "25"], "not a multiple of --micro-batch"),
        (["--run", "r", "--layout", "tp=2,tp=2"], "--layout 'tp=2,tp=2'"),
        (["--run", "r", "--model", "huge"], "--model 'huge' is unknown"),
        (["--run", "r", "--inject", "killnode:node=1:step=2"], "a worker injects only hang:rank=R:step=S"),
        (["--run", "r", "--inject", "hang:rank=1"], "field 'step' is missing"),
        (["--run", "r", "--step-sleep", "-1"], "--step-sleep must be >= 0 seconds, got -1"),
    ]:
        with pytest.raises(RequestError, match=message):
            parse_flags(flags)
    assert parse_flags(["--run", "r", "--layout", "tp=2"]).layout == "tp=2"
    assert parse_flags(["--run", "r", "--step-sleep", "0.5"]).step_sleep_s == 0.5
    assert parse_flags(["--run", "r", "--inject", "hang:rank=1:step=4"]).inject == ("hang:rank=1:step=4",)


def test_ls_shows_a_runs_recoveries(tmp_path):
    import subprocess
    import sys

    rd = RunDir(str(tmp_path / "run"))
    rd.make()
    os_ckpt = tmp_path / "run" / "ckpt"
    os_ckpt.mkdir()
    rd.append_step(StepRecord(step=1, loss=1.0, world_size=2, layout="pp=1,dp=2,tp=1", grad_accum=6, step_s=0.1, time=1.0))
    rd.emit_recovery(recovery_record(_plan(), [{"first": 100.5, "restore": {"step": 7, "tier": "peer", "bytes": 1}}]))
    for arg in (rd.root, str(os_ckpt)):
        p = subprocess.run([sys.executable, "-m", "elastickit.cli.main", "ls", arg], capture_output=True, text=True, check=False)
        assert p.returncode == 0, p.stderr
        assert "killnode n2" in p.stdout and "dp=3->dp=2" in p.stdout and "step 7 (peer)" in p.stdout, p.stdout


def test_restore_info_reads_a_dict_or_a_report():
    from types import SimpleNamespace

    from elastickit.elastic.runtime import _restore_info

    assert _restore_info(None)["step"] == 0
    assert _restore_info({"step": 4, "tier": "peer", "bytes": 9})["bytes"] == 9
    got = _restore_info(SimpleNamespace(step=5, tier="local", path="/x"))
    assert got == {"step": 5, "tier": "local", "bytes": 0, "path": "/x"}
    peer = _restore_info(SimpleNamespace(step=5, tier="local", path="/x", bytes=7, fetched=("rank-00001.safetensors",)))
    assert peer == {"step": 5, "tier": "peer", "bytes": 7, "path": "/x"}
