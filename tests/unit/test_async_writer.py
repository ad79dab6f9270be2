"""The lazy, asynchronous, multi-tier writer in one process (DESIGN.md section 4)."""

import math
import os
import threading

import pytest
import torch
from elastickit.checkpoint.drivers import snapshot as snapshot_mod
from elastickit.checkpoint.events import read_events
from elastickit.checkpoint.format.directory import list_checkpoints
from elastickit.checkpoint.policy import IntervalPolicy, mtbf_from_events, young_daly_interval_s
from elastickit.checkpoint.storage import files as writer_mod
from elastickit.checkpoint.tiers import Tiers, TierSpec

import elastickit as ek


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        self.seen += 1  # a buffer changed in forward, before any optimizer step
        return self.lin(x)


def _setup(seed=0):
    torch.manual_seed(seed)
    m = Net()
    return m, torch.optim.SGD(m.parameters(), lr=0.5)


def _train_step(m, o):
    o.zero_grad()
    m(torch.ones(2, 16)).sum().backward()
    o.step()


@pytest.fixture
def gated_copy(monkeypatch):
    """Every background copy waits until `gate` is set (or 10 s): whoever runs before the fence
    can open it, whoever runs after the fence cannot."""
    gate, log = threading.Event(), []
    real = snapshot_mod.Snapshotter._copy

    def gated(self, snap, sources, event):
        gate.wait(10)
        real(self, snap, sources, event)
        log.append(("copied", snap.step))

    monkeypatch.setattr(snapshot_mod.Snapshotter, "_copy", gated)
    return gate, log


def test_fence_keeps_the_snapshot_exact(tmp_path, gated_copy):
    gate, log = gated_copy
    m, o = _setup()
    ck = ek.Checkpointer(str(tmp_path))
    _train_step(m, o)
    expect_w = m.lin.weight.detach().clone()
    expect_seen = m.seen.clone()
    h = ck.save(1, {"model": m, "optim": o})  # installs the fence hook
    o.register_step_pre_hook(lambda *a: log.append(("step", None)))  # runs after the fence
    assert not h.staged.done()  # save returned before the copy finished
    m.register_forward_hook(lambda *a: gate.set())  # the copy goes on once forward ran
    _train_step(m, o)  # forward changes the buffer at once; the step waits at the fence
    assert log[:2] == [("copied", 1), ("step", None)]
    assert not torch.equal(m.lin.weight, expect_w)
    ck.close()
    m2, o2 = _setup(1)
    assert ek.Checkpointer(str(tmp_path)).restore({"model": m2, "optim": o2}) == 1
    assert torch.equal(m2.lin.weight, expect_w)
    assert torch.equal(m2.seen, expect_seen)  # copied eagerly: no optimizer fences it


class Custom(torch.optim.SGD):
    """An optimizer from outside torch.optim: its step may change tensors before its closure."""


@pytest.mark.parametrize("positional", [False, True])
def test_a_step_with_a_closure_waits_after_the_closure(tmp_path, gated_copy, positional):
    # Lightning steps as optimizer.step(closure=training_step_and_backward): the copy overlaps
    # the closure's forward and backward, and still sees the values of the step it saved.
    gate, log = gated_copy
    m, o = _setup()
    ck = ek.Checkpointer(str(tmp_path))
    _train_step(m, o)
    expect_w = m.lin.weight.detach().clone()
    ck.save(1, {"model": m, "optim": o})

    def closure():
        log.append(("closure", None))
        gate.set()
        o.zero_grad()
        loss = m(torch.ones(2, 16)).sum()
        loss.backward()
        return loss

    loss = o.step(closure) if positional else o.step(closure=closure)
    assert log == [("closure", None), ("copied", 1)]
    assert loss is not None and not torch.equal(m.lin.weight, expect_w)
    ck.close()
    m2, o2 = _setup(1)
    assert ek.Checkpointer(str(tmp_path)).restore({"model": m2, "optim": o2}) == 1
    assert torch.equal(m2.lin.weight, expect_w)


def test_an_optimizer_from_elsewhere_waits_before_its_closure(tmp_path, gated_copy):
    gate, log = gated_copy
    torch.manual_seed(0)
    m = Net()
    o = Custom(m.parameters(), lr=0.5)
    ck = ek.Checkpointer(str(tmp_path))
    _train_step(m, o)
    ck.save(1, {"model": m, "optim": o})

    def closure():
        log.append(("closure", None))
        gate.set()
        return m(torch.ones(2, 16)).sum()

    o.step(closure=closure)
    assert log == [("copied", 1), ("closure", None)]
    ck.close()


def test_slow_persistent_tier_never_blocks_and_newest_wins(tmp_path, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    real = writer_mod.write_file

    def gated(*a, **k):
        entered.set()
        gate.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(writer_mod, "write_file", gated)
    m, o = _setup()
    ck = ek.Checkpointer(str(tmp_path), tiers=Tiers(host_buffers=3))
    handles = []
    for step in range(1, 7):
        _train_step(m, o)
        handles.append(ck.save(step, {"model": m, "optim": o}))
        if step == 1:
            assert entered.wait(10)  # the tier took step 1 and is stuck writing it
    # The tier is stuck on step 1, yet every save returned and no save was skipped.
    assert all(h.scheduled for h in handles)
    assert not handles[0].durable.done()
    gate.set()
    ck.wait()
    steps = [c.step for c in list_checkpoints(str(tmp_path)) if c.complete]
    assert steps[0] == 1 and steps[-1] == 6 and len(steps) < 6
    assert handles[-1].durable.result().endswith("step-00000006")
    ck.close()
    records = {r["step"]: r for r in read_events(str(tmp_path / "events.jsonl")) if r["type"] == "checkpoint"}
    superseded = [s for s, r in records.items() if "persistent" in r["skipped_tiers"]]
    assert superseded and set(superseded) == set(range(2, 6)) - set(steps)
    for key in ("blocking_s", "snapshot_s", "bytes", "tiers", "skipped_tiers"):
        assert key in records[6], key
    assert records[6]["tiers"]["persistent"]["status"] == "committed"
    assert records[6]["tiers"]["persistent"]["persist_s"] >= 0


def test_no_free_host_buffer_skips_the_save_instead_of_blocking(tmp_path, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    real = writer_mod.write_file
    monkeypatch.setattr(writer_mod, "write_file", lambda *a, **k: (entered.set(), gate.wait(60), real(*a, **k))[2])
    m, o = _setup()
    ck = ek.Checkpointer(str(tmp_path), tiers=Tiers(host_buffers=1, memory=None))
    h1 = ck.save(1, {"model": m})
    h1.staged.result()
    assert entered.wait(10)  # the tier took step 1 and is stuck writing it
    h2 = ck.save(2, {"model": m})
    assert (h1.scheduled, h2.scheduled) == (True, False) and "no host buffer" in h2.reason
    gate.set()
    ck.close()
    assert ck.host_buffer_bytes() >= 16 * 16 * 4


def test_retention_keep_last_and_keep_every(tmp_path):
    m, o = _setup()
    tiers = Tiers(persistent=TierSpec(keep_last=2, keep_every=3))
    with ek.Checkpointer(str(tmp_path), tiers=tiers) as ck:
        for step in range(1, 9):
            ck.save(step, {"model": m}).durable.result()
    assert [c.step for c in list_checkpoints(str(tmp_path))] == [3, 6, 7, 8]


def test_compressed_tier_round_trip(tmp_path):
    m, o = _setup()
    with torch.no_grad():
        m.lin.weight.zero_()  # compressible
    _train_step(m, o)
    tiers = Tiers(persistent=TierSpec(zstd_level=3))
    with ek.Checkpointer(str(tmp_path), tiers=tiers) as ck:
        ck.save(1, {"model": m, "optim": o})
    files = os.listdir(tmp_path / "step-00000001")
    assert "rank-00000.safetensors.zst" in files
    m2, o2 = _setup(3)
    assert ek.Checkpointer(str(tmp_path)).restore({"model": m2, "optim": o2}) == 1
    assert torch.equal(m2.lin.weight, m.lin.weight) and torch.equal(m2.lin.bias, m.lin.bias)
    rec = [r for r in read_events(str(tmp_path / "events.jsonl")) if r["type"] == "checkpoint"][0]
    assert rec["tiers"]["persistent"]["compression_ratio"] > 1.0


def test_memory_tier_restores_in_process(tmp_path):
    m, o = _setup()
    ck = ek.Checkpointer(str(tmp_path), tiers=Tiers(persistent=None))
    _train_step(m, o)
    ck.save(1, {"model": m, "optim": o}).staged.result()
    want = m.lin.weight.detach().clone()
    _train_step(m, o)
    assert ck.restore({"model": m, "optim": o}) == 1
    assert torch.equal(m.lin.weight, want)
    assert [r["tier"] for r in read_events(str(tmp_path / "events.jsonl")) if r["type"] == "restore"] == ["memory"]
    ck.close()


def test_local_and_persistent_tiers(tmp_path):
    m, o = _setup()
    local = str(tmp_path / "shm" / "{node}")
    with ek.Checkpointer(str(tmp_path / "p"), tiers=Tiers(local=TierSpec(path=local, keep_last=1))) as ck:
        for step in (1, 2):
            ck.save(step, {"model": m}).durable.result()
    (run,) = os.listdir(tmp_path / "shm" / "0")  # the run's own directory in the shared path
    assert [c.step for c in list_checkpoints(str(tmp_path / "shm" / "0" / run))] == [2]
    assert [c.step for c in list_checkpoints(str(tmp_path / "p"))] == [1, 2]
    m2, _ = _setup(5)
    ck2 = ek.Checkpointer(str(tmp_path / "p"), tiers=Tiers(local=TierSpec(path=local)))
    assert ck2.restore({"model": m2}) == 2
    assert [r["tier"] for r in read_events(str(tmp_path / "p" / "events.jsonl")) if r["type"] == "restore"] == ["local"]
    ck2.close()


def test_young_daly_arithmetic():
    assert young_daly_interval_s(2.0, 3600.0) == pytest.approx(120.0)
    assert young_daly_interval_s(0.5, 3 * 3600) == pytest.approx(math.sqrt(2 * 0.5 * 10800))
    p = IntervalPolicy(auto=True, mtbf_s=3600.0)
    assert p.next_due_step(10, step_time_s=0.5, cost_s=2.0) == 10 + 240
    assert IntervalPolicy(every_seconds=30).next_due_step(4, step_time_s=2.0, cost_s=9) == 19
    assert IntervalPolicy(every=5).next_due_step(10, step_time_s=1, cost_s=1) == 15
    with pytest.raises(ValueError, match="choose one"):
        IntervalPolicy(every=2, auto=True)


def test_mtbf_learned_from_event_log(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text(
        '{"type":"checkpoint","time":1000}\n{"type":"crash","time":4000}\n'
        '{"type":"hang","time":6000}\n{"type":"checkpoint","time":7000}\n'
    )
    assert mtbf_from_events(str(p)) == pytest.approx(3000.0)
    assert IntervalPolicy(auto=True, events_path=str(p)).mtbf() == pytest.approx(3000.0)


def test_mtbf_reads_the_event_log_as_every_reader_does(tmp_path):
    """A record torn by a killed writer costs its own line, not the failures around it."""
    p = tmp_path / "events.jsonl"
    p.write_text(
        '{"type":"checkpoint","time":1000}\n{"type":"crash","time":4000}\n{"type":"checkp\n'
        '{"type":"hang","time":6000}\n{"type":"checkpoint","time":7000}\n'
    )
    assert mtbf_from_events(str(p)) == pytest.approx(3000.0)
    assert mtbf_from_events(str(tmp_path / "absent.jsonl")) is None


def test_every_seconds_policy_schedules_by_measured_step_time():
    # The schedule on a clock the test moves: 0.01 s per step, a checkpoint every 0.05 s. At
    # step 1 no step time is measured yet, so step 2 is due; from then on every 5th step.
    from elastickit.checkpoint.coord import LocalCoordinator

    from elastickit.schedule import SaveSchedule

    now = [0.0]
    sched = SaveSchedule(IntervalPolicy(every_seconds=0.05), LocalCoordinator(), rank=0, world_size=1, clock=lambda: now[0])
    taken = []
    for step in range(1, 25):
        now[0] += 0.01
        sched.settle()
        sched.called(step)
        if sched.due(step):
            taken.append(step)
            sched.saved(step, cost_s=0.001)
    assert taken == [1, 2, 7, 12, 17, 22]
    assert sched.step_time_s == pytest.approx(0.01)
