"""The file tiers' pull protocol, with two ranks in one process (AsyncWriters on a HashStore).

Deterministic: the writers run on a `ManualClock` whose time stands still, and every write costs
one CPU second on it, so after its first checkpoint (step 0) a tier rests until the test
flushes it; the tier workers say when they wait for a step or finished one (`observe`), and the
test waits for exactly that. Each case thus sets up which snapshots each rank holds when the
ranks agree.
"""

import logging
import threading

import torch
import torch.distributed as dist
from elastickit.checkpoint.coord import StoreCoordinator
from elastickit.checkpoint.drivers.clock import ManualClock
from elastickit.checkpoint.drivers.context import WriterContext
from elastickit.checkpoint.drivers.pipeline import AsyncWriter
from elastickit.checkpoint.events import EventLog, read_events
from elastickit.checkpoint.format.directory import list_checkpoints, load_manifest
from elastickit.checkpoint.format.items import SaveItem
from elastickit.checkpoint.format.manifest import LayoutRecord
from elastickit.checkpoint.format.stfile import StFile
from elastickit.checkpoint.plan.pieces import default_pieces
from elastickit.checkpoint.tiers import Tiers, TierSpec

WAIT_S = 60  # a guard against a hang, never reached when the tiers behave


class _Notes:
    """What the tier workers of one rank said, in order: (what, step)."""

    def __init__(self):
        self.seen: list[tuple[str, int]] = []
        self._cond = threading.Condition()

    def __call__(self, tier: str, what: str, step: int) -> None:
        with self._cond:
            self.seen.append((what, step))
            self._cond.notify_all()

    def wait_for(self, what: str, step: int, times: int = 1) -> None:
        with self._cond:
            said = lambda: self.seen.count((what, step)) >= times
            assert self._cond.wait_for(said, WAIT_S), (what, step, times, self.seen)


class _Rank:
    """One rank: a live tensor of its own and its writer on the test's clock."""

    def __init__(self, rank: int, store, root: str, tiers: Tiers, clock: ManualClock):
        self.rank = rank
        self.clock = clock
        self.live = torch.zeros(5)
        name = f"w{rank}"
        pieces, specs = default_pieces(name, self.live)
        self.items = [SaveItem(key=name, tensor=self.live, pieces=pieces, specs=specs)]
        ctx = WriterContext(
            rank=rank, world_size=2, tiers=tiers, persistent_root=root,
            layout=LayoutRecord(axes=(("world", 2),)), rules=(), framework={}, fsync=False, timeout_s=30,
        )
        self.notes = _Notes()
        self.writer = AsyncWriter(
            ctx,
            lambda tier: StoreCoordinator(store, rank=rank, world_size=2, prefix=f"t/{tier}", timeout_s=30),
            EventLog(f"{root}/events.jsonl" if rank == 0 else None),
            clock=clock,
            observe=self.notes,
        )

    def save(self, step: int):
        self.live.fill_(step)
        snap, durable, reason = self.writer.submit(step, self.items, {}, {"rank": self.rank}, 64, 0.0)
        assert snap is not None, reason
        snap.staged.result()
        return durable


def _pair(tmp_path, tiers=None, *, rested=True):
    """Two ranks; `rested`: both wrote step 0, and their tiers now rest until flushed."""
    store = dist.HashStore()
    tiers = tiers or Tiers(persistent=TierSpec(keep_last=10))
    clock = ManualClock(cpu_per_read=1.0)  # every write costs 1 s: the tier then rests 49 s
    ranks = [_Rank(r, store, str(tmp_path), tiers, clock) for r in range(2)]
    if rested:
        for r in ranks:
            r.save(0)
        for r in ranks:
            r.notes.wait_for("done", 0)
        assert _committed(tmp_path) == [0]
    return ranks


def _flush(ranks):
    for r in ranks:
        r.writer.flush()


def _close(ranks):
    _flush(ranks)
    for r in ranks:
        r.writer.close()


def _at_once(ranks, call):
    """`call(rank)` on every rank at the same time, as the ranks' training threads would; returns
    rank -> result. Fails when one has not returned within WAIT_S: on the test's clock, which
    stands still, a rank waiting for its deadline never would."""
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r.rank, call(r))) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    return results


def _committed(tmp_path):
    return [c.step for c in list_checkpoints(str(tmp_path)) if c.complete]


def _values(tmp_path, step):
    """Each logical tensor of the committed checkpoint, read back through its manifest."""
    path = f"{tmp_path}/step-{step:08d}"
    manifest = load_manifest(path)
    out = {}
    for name, entry in manifest.tensors.items():
        (shard,) = entry.shards
        with StFile(f"{path}/{shard.file}", manifest.files[shard.file]) as f:
            out[name] = f.tensor(shard.key).tolist()
    return out


def test_a_rank_behind_takes_the_step_the_others_hold(tmp_path):
    r0, r1 = _pair(tmp_path)
    for step in range(1, 5):
        r0.save(step)
    for step in range(1, 4):
        r1.save(step)  # one step behind
    _flush((r0, r1))
    r1.notes.wait_for("waiting", 4)  # the ranks agreed on step 4; rank 1 waits for it
    assert _committed(tmp_path) == [0]
    durable = r1.save(4)
    assert durable.result(timeout=WAIT_S).endswith("step-00000004")
    _close((r0, r1))
    assert _committed(tmp_path) == [0, 4]
    assert _values(tmp_path, 4) == {"w0": [4.0] * 5, "w1": [4.0] * 5}
    records = {e["step"]: e for e in read_events(f"{tmp_path}/events.jsonl") if e["type"] == "checkpoint"}
    assert records[4]["tiers"]["persistent"]["status"] == "committed"
    assert all("persistent" in records[s]["skipped_tiers"] for s in (1, 2, 3))


def test_a_step_one_rank_skipped_is_given_up_for_a_newer_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="elastickit")
    r0, r1 = _pair(tmp_path)
    for step in range(1, 8):
        r0.save(step)
    for step in range(1, 7):
        r1.save(step)
    _flush((r0, r1))
    r1.notes.wait_for("waiting", 7)  # they agree on 7; rank 1 waits for it
    r1.save(8)  # ... but skips 7 (as when no host buffer is free): the ranks try again
    r0.notes.wait_for("retry", 7)
    r0.notes.wait_for("waiting", 8)  # now they agree on 8, which rank 0 has not saved yet
    assert _committed(tmp_path) == [0]
    r0.save(8)
    _close((r0, r1))
    assert _committed(tmp_path) == [0, 8]
    assert "no longer holds step 7" in caplog.text
    assert _values(tmp_path, 8) == {"w0": [8.0] * 5, "w1": [8.0] * 5}
    manifest = load_manifest(f"{tmp_path}/step-00000008")
    assert [o["rank"] for o in manifest.rank_objects] == [0, 1]


def test_a_tier_rests_after_a_write_then_takes_the_newest(tmp_path):
    # Step 0 cost 1 CPU second; at max_busy_fraction 0.02 the tier rests 49 s before the next.
    r0, r1 = _pair(tmp_path)
    for step in (1, 2):
        for r in (r0, r1):
            r.save(step)
            r.notes.wait_for("resting", step)
    r0.clock.advance(48)  # the ranks share the clock
    for r in (r0, r1):
        r.notes.wait_for("resting", 2, times=2)  # it looked again, and rests on
    assert _committed(tmp_path) == [0]
    r0.clock.advance(1)
    for r in (r0, r1):
        r.notes.wait_for("done", 2)  # rested: it took the newest without a flush
    assert _committed(tmp_path) == [0, 2]
    _close((r0, r1))
    records = {e["step"]: e for e in read_events(f"{tmp_path}/events.jsonl") if e["type"] == "checkpoint"}
    assert records[1]["skipped_tiers"]["persistent"] == "superseded by step 2 (the tier was busy)"
    assert records[2]["tiers"]["persistent"]["cpu_s"] == 1.0


def test_saves_never_wait_for_a_busy_tier_and_the_newest_lands(tmp_path):
    # A tier that never rests writes while the saves go on.
    r0, r1 = _pair(tmp_path, Tiers(persistent=TierSpec(keep_last=10, max_busy_fraction=1.0)), rested=False)
    handles = []
    for step in range(1, 30):
        handles.append(r0.save(step))
        r1.save(step)
    _close((r0, r1))
    steps = _committed(tmp_path)
    assert steps[-1] == 29 and handles[-1].result().endswith("step-00000029")
    assert all(h.done() for h in handles)  # every save is resolved: committed or superseded
    for s in steps:
        assert _values(tmp_path, s) == {"w0": [float(s)] * 5, "w1": [float(s)] * 5}


def test_a_final_step_one_rank_skipped_fails_clearly_instead_of_hanging(tmp_path):
    r0, r1 = _pair(tmp_path)
    for step in (1, 2, 3):
        r0.save(step)
    for step in (1, 2):
        r1.save(step)  # rank 1 skipped step 3 (no free host buffer) and trains no further
    results = _at_once((r0, r1), lambda r: r.writer.drain())
    assert "step 3 is not held by rank(s) [1]" in str(results[0][0])
    assert _committed(tmp_path) == [0]
    _close((r0, r1))


def test_a_step_skipped_after_the_tier_wrote_its_newest_fails_clearly_at_close(tmp_path):
    # One host buffer each. Rank 1 skips step 2 while its tier writes step 1 from that buffer;
    # once step 1 is written, rank 1 holds nothing its tier has not written, so the tier idles
    # while rank 0's tier waits in a round for step 2: closing must end that round at once.
    tiers = Tiers(persistent=TierSpec(keep_last=10), memory=None, host_buffers=1)
    r0, r1 = _pair(tmp_path, tiers)
    r0.save(1)
    r1.save(1)
    r1.writer.flush()
    r1.notes.wait_for("agreeing", 1)  # rank 1's tier holds the only buffer, in the round for 1
    snap, _durable, reason = r1.writer.submit(2, r1.items, {}, {"rank": 1}, 64, 0.0)
    assert snap is None and "no host buffer is free" in reason
    r0.writer.flush()
    for r in (r0, r1):
        r.notes.wait_for("done", 1)
    assert _committed(tmp_path) == [0, 1]
    durable = r0.save(2)  # rank 0 holds step 2; rank 1 skipped it
    errors = _at_once((r0, r1), lambda r: r.writer.drain())
    assert "step 2 is not held by rank(s) [1]" in str(errors[0][0])
    assert "step 2 is not held by rank(s) [1]" in str(durable.exception())
    _at_once((r0, r1), lambda r: r.writer.close())  # no tier waits out its timeout
    assert _committed(tmp_path) == [0, 1]
