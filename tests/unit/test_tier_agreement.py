"""The file tiers' pull protocol, with two ranks in one process (AsyncWriters on a HashStore).

Deterministic: the tiers are held back until the test flushes them, so each case sets up
exactly which snapshots each rank holds when the ranks agree.
"""

import logging
import threading
import time

import torch
import torch.distributed as dist
from elastickit.checkpoint.format.directory import list_checkpoints, load_manifest
from elastickit.checkpoint.coord import StoreCoordinator
from elastickit.checkpoint.events import EventLog, read_events
from elastickit.checkpoint.format.items import SaveItem
from elastickit.checkpoint.format.manifest import LayoutRecord
from elastickit.checkpoint.drivers.pipeline import AsyncWriter, WriterContext
from elastickit.checkpoint.plan.pieces import default_pieces
from elastickit.checkpoint.format.stfile import StFile
from elastickit.checkpoint.tiers import Tiers, TierSpec


class _Rank:
    """One rank: a live tensor of its own and its writer, whose tiers wait for a flush."""

    def __init__(self, rank: int, store, root: str, tiers: Tiers):
        self.rank = rank
        self.live = torch.zeros(5)
        name = f"w{rank}"
        pieces, specs = default_pieces(name, self.live)
        self.items = [SaveItem(key=name, tensor=self.live, pieces=pieces, specs=specs)]
        ctx = WriterContext(
            rank=rank, world_size=2, tiers=tiers, persistent_root=root,
            layout=LayoutRecord(axes=(("world", 2),)), rules=(), framework={}, fsync=False, timeout_s=30,
        )
        self.writer = AsyncWriter(
            ctx,
            lambda tier: StoreCoordinator(store, rank=rank, world_size=2, prefix=f"t/{tier}", timeout_s=30),
            EventLog(f"{root}/events.jsonl" if rank == 0 else None),
        )
        for w in self.writer.workers.values():
            w._rest_until = time.monotonic() + 1e6  # write nothing until flushed

    def save(self, step: int):
        self.live.fill_(step)
        snap, durable, reason = self.writer.submit(step, self.items, {}, {"rank": self.rank}, 64, 0.0)
        assert snap is not None, reason
        snap.staged.result()
        return durable


def _pair(tmp_path, tiers=None):
    store = dist.HashStore()
    tiers = tiers or Tiers(persistent=TierSpec(keep_last=10))
    return [_Rank(r, store, str(tmp_path), tiers) for r in range(2)]


def _close(ranks):
    for r in ranks:
        r.writer.flush()
    for r in ranks:
        r.writer.close()


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
    for r in (r0, r1):
        r.writer.flush()
    time.sleep(0.3)  # the ranks agree on step 4; rank 1 waits for it
    assert _committed(tmp_path) == []
    durable = r1.save(4)
    assert durable.result(timeout=30).endswith("step-00000004")
    _close((r0, r1))
    assert _committed(tmp_path) == [4]
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
    for r in (r0, r1):
        r.writer.flush()
    time.sleep(0.3)  # they agree on 7; rank 1 waits for it
    r1.save(8)  # ... but skips 7 (as when no host buffer is free): the ranks try again
    time.sleep(0.3)  # now they agree on 8, which rank 0 has not saved yet
    assert _committed(tmp_path) == []
    r0.save(8)
    _close((r0, r1))
    assert _committed(tmp_path) == [8]
    assert "no longer holds step 7" in caplog.text
    assert _values(tmp_path, 8) == {"w0": [8.0] * 5, "w1": [8.0] * 5}
    manifest = load_manifest(f"{tmp_path}/step-00000008")
    assert [o["rank"] for o in manifest.rank_objects] == [0, 1]


def test_saves_never_wait_for_a_busy_tier_and_the_newest_lands(tmp_path):
    r0, r1 = _pair(tmp_path)
    for r in (r0, r1):
        for w in r.writer.workers.values():
            w._rest_until = 0.0
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
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r.rank, r.writer.drain())) for r in (r0, r1)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert time.monotonic() - t0 < 20  # not the 30 s store timeout, nor for ever
    assert "step 3 is not held by rank(s) [1]" in str(results[0][0])
    assert _committed(tmp_path) == []
    _close((r0, r1))
