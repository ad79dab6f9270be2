"""The asynchronous, multi-level writer: a snapshot flows down the tiers in the background.

Consistency across ranks without blocking training: every decision (which host buffer a
snapshot uses, which tiers take it, which are skipped because they fall behind) is a pure
function (`decide`) of what every rank reported in the one store round `save()` makes anyway.
Each tier then processes the same sequence of checkpoints on every rank, in order, on its own
thread with its own store prefix, so its commit rounds always pair up.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .catalog import list_checkpoints, remove_incomplete
from .coord import Coordinator
from .errors import ElastickitError
from .events import EventLog
from .integrity import atomic_write_text, fsync_dir
from .manifest import MANIFEST_NAME, LayoutRecord, Manifest, step_dir_name
from .snapshot import Slot, SlotPool, Snapshot
from .tiers import Tiers, TierSpec
from .writer import SavePlan, SaveRequest, write_checkpoint

log = logging.getLogger("elastickit")

FILE_TIERS = ("local", "persistent")


@dataclass(frozen=True, slots=True, kw_only=True)
class RankStatus:
    """What one rank reports in the save round.

    Attributes:
        unclaimed: tier -> steps queued on that tier that its worker has not started.
        slots: per host buffer: [index, step held (or -1), blocked, soft tier refs, in memory].
            `blocked`: a tier is writing from it. Soft refs are tiers that queued it without
            starting; `in memory` means the memory tier retains it.
        memory_steps: the steps the memory tier retains, oldest first.
    """

    unclaimed: dict[str, list[int]]
    slots: list[list[Any]]
    memory_steps: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"unclaimed": self.unclaimed, "slots": self.slots, "memory": self.memory_steps}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RankStatus:
        return cls(unclaimed=dict(d["unclaimed"]), slots=list(d["slots"]), memory_steps=list(d["memory"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What every rank does with one save.

    Attributes:
        slot: the host buffer for the new snapshot (None: the save is skipped).
        tiers: the tiers that queue it.
        drop: tier -> queued steps no worker has started anywhere, superseded by this one.
        skipped: tier (or "all") -> why it does not take this checkpoint.
    """

    slot: int | None
    tiers: tuple[str, ...]
    drop: dict[str, list[int]]
    skipped: dict[str, str]


def decide(
    statuses: list[RankStatus], *, max_slots: int, file_tiers: tuple[str, ...], memory_keep: int
) -> Decision:
    """The same decision on every rank, from every rank's status (pure).

    A tier that falls behind never makes training wait: a queued checkpoint that no rank's worker
    has started is superseded by the new one (the newest checkpoint always reaches every tier;
    intermediate ones are skipped and logged). A save is skipped only when no host buffer can
    be freed on every rank.
    """
    drop = {}
    for t in file_tiers:
        common = set.intersection(*(set(s.unclaimed.get(t, [])) for s in statuses))
        if common:
            drop[t] = sorted(common)
    evicted: set[int] = set()
    if memory_keep:
        mem = statuses[0].memory_steps
        if len(mem) >= memory_keep:
            evicted = set(mem[: len(mem) - memory_keep + 1])

    def reusable(slot: list[Any]) -> bool:
        _index, step, blocked, soft, in_memory = slot
        if blocked:
            return False
        if any(step not in drop.get(t, []) for t in soft):
            return False
        return not in_memory or step in evicted

    per_rank = [{sl[0] for sl in s.slots if reusable(sl)} for s in statuses]
    common_free = set.intersection(*per_rank) if per_rank else set()
    counts = {len(s.slots) for s in statuses}
    skipped = {t: f"superseded step(s) {steps} before tier {t} started them" for t, steps in drop.items()}
    if common_free:
        slot: int | None = min(common_free)
    elif len(counts) == 1 and (n := counts.pop()) < max_slots:
        slot = n
    else:
        return Decision(
            slot=None,
            tiers=(),
            drop={},
            skipped={"all": "no host buffer is free on every rank (tiers are still writing earlier checkpoints)"},
        )
    return Decision(slot=slot, tiers=file_tiers, drop=drop, skipped=skipped)


@dataclass(eq=False)
class _Job:
    snap: Snapshot
    plan: SavePlan
    durable: Future[str]
    pending: set[str]
    record: dict[str, Any]
    results: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterContext:
    """What the tier workers need to know about the job and the run."""

    rank: int
    world_size: int
    tiers: Tiers
    persistent_root: str
    layout: LayoutRecord
    rules: tuple[dict[str, Any], ...]
    framework: dict[str, str]
    fsync: bool
    peer_group: Any = None  # a dedicated gloo process group for peer copies


class TierWorker:
    """One file tier (local or persistent) on its own thread, taking checkpoints in order.

    A queued job is "unclaimed" until the worker starts it; the save round may drop unclaimed
    jobs (superseded). Claiming takes `lock`, which the save round holds while it reports and
    applies its decision, so a rank never drops a job its worker has started.
    """

    def __init__(
        self,
        name: str,
        spec: TierSpec,
        root: str,
        coord: Coordinator,
        ctx: WriterContext,
        on_done: Callable[[_Job, str, str | None, dict[str, Any]], None],
        release: Callable[[Slot, str], None],
        lock: threading.Lock,
    ) -> None:
        self.name = name
        self.spec = spec
        self.root = root
        self.coord = coord
        self.ctx = ctx
        self._on_done = on_done
        self._release = release
        self.lock = lock
        self._wake = threading.Condition(lock)
        self.pending: list[_Job] = []
        self.current: _Job | None = None
        self._stop = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"elastickit-{name}", daemon=True)
        self._thread.start()

    def unclaimed(self) -> list[int]:
        """Steps queued and not started (call with `lock` held)."""
        return [j.snap.step for j in self.pending]

    def put(self, job: _Job) -> None:
        """Queue a job (call with `lock` held)."""
        self.pending.append(job)
        self._wake.notify()

    def drop(self, steps: list[int]) -> list[_Job]:
        """Remove unclaimed jobs of these steps (call with `lock` held); returns them."""
        gone = [j for j in self.pending if j.snap.step in steps]
        self.pending = [j for j in self.pending if j.snap.step not in steps]
        return gone

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.pending and not self._stop:
                    self._wake.wait()
                if not self.pending:
                    return
                job = self.current = self.pending.pop(0)
            stats: dict[str, Any] = {}
            error = None
            try:
                t0 = t1 = time.monotonic()
                cpu0 = time.thread_time()
                manifest = self._write(job)  # overlaps the copy: waits item by item
                job.snap.staged.result()
                stats["persist_s"] = round(time.monotonic() - t1, 6)
                stats["cpu_s"] = round(time.thread_time() - cpu0, 6)
                stats["queued_s"] = round(t1 - t0, 6)
                stats["stored_bytes"] = sum(f.size_bytes for f in manifest.files.values())
                logical = manifest.total_bytes
                stats["compression_ratio"] = round(logical / stats["stored_bytes"], 3) if stats["stored_bytes"] else None
                if self.name == "local":
                    self._share_manifest(manifest)
                    if self.ctx.tiers.peer:
                        t2 = time.monotonic()
                        stats["peer_bytes"] = self._peer_copy(manifest)
                        stats["peer_s"] = round(time.monotonic() - t2, 6)
                self._retain()
            except ElastickitError as e:
                error = str(e)
            except Exception as e:  # a tier failure is reported, never raised into training
                error = f"{type(e).__name__}: {e}"
            finally:
                with self.lock:
                    self.current = None
                    self._release(job.snap.slot, self.name)
            self._on_done(job, self.name, error, stats)
            self._rest(stats.get("cpu_s", 0.0))

    def _rest(self, cpu_s: float) -> None:
        """Stay under `max_busy_fraction` of a core; wake early only to stop."""
        f = self.spec.max_busy_fraction
        if f >= 1 or cpu_s <= 0:
            return
        # Its own event, not the shared lock's condition: resting must never wait for the lock
        # that the training thread holds through a save round.
        self._stopping.wait(timeout=cpu_s * (1 / f - 1))

    def _write(self, job: _Job) -> Manifest:
        req = SaveRequest(
            root=self.root,
            step=job.snap.step,
            items=job.snap.items,
            objects=job.snap.objects,
            rank_object=job.snap.rank_object,
            layout=self.ctx.layout,
            rules=self.ctx.rules,
            framework=self.ctx.framework,
            fsync=self.ctx.fsync,
            zstd_level=self.spec.zstd_level,
            zstd_threads=self.spec.zstd_threads,
            before_item=job.snap.wait_item,
        )
        return write_checkpoint(req, self.coord, plan=job.plan)

    def _node_leader(self) -> bool:
        return self.ctx.rank % self.ctx.tiers.node_size(self.ctx.world_size) == 0

    def _share_manifest(self, manifest: Manifest) -> None:
        # Rank 0 committed the manifest in its node's directory; every other node gets a copy,
        # so that each node-local directory is self-describing.
        if self._node_leader() and self.ctx.rank != 0:
            d = os.path.join(self.root, step_dir_name(manifest.step))
            os.makedirs(d, exist_ok=True)
            atomic_write_text(os.path.join(d, MANIFEST_NAME), manifest.dumps(), fsync=self.ctx.fsync)

    def _peer_copy(self, manifest: Manifest) -> int:
        """Send this rank's local file to its buddy; store the ward's file here. Returns bytes sent."""
        import torch.distributed as dist

        tiers, rank, world = self.ctx.tiers, self.ctx.rank, self.ctx.world_size
        buddy, ward = tiers.buddy(rank, world), tiers.ward(rank, world)
        if buddy == rank:
            return 0
        step_dir = os.path.join(self.root, step_dir_name(manifest.step))
        mine = [f for f in manifest.files.values() if f.rank == rank]
        data = b""
        if mine:
            with open(os.path.join(step_dir, mine[0].name), "rb") as f:
                data = f.read()
        group = self.ctx.peer_group
        size_out = torch.tensor([len(data)], dtype=torch.int64)
        size_in = torch.zeros(1, dtype=torch.int64)
        works = [dist.isend(size_out, buddy, group=group), dist.irecv(size_in, ward, group=group)]
        for w in works:
            w.wait()
        buf_in = torch.empty(int(size_in.item()), dtype=torch.uint8)
        works = []
        if data:
            works.append(dist.isend(torch.frombuffer(bytearray(data), dtype=torch.uint8), buddy, group=group))
        if buf_in.numel():
            works.append(dist.irecv(buf_in, ward, group=group))
        for w in works:
            w.wait()
        theirs = [f for f in manifest.files.values() if f.rank == ward]
        if theirs and buf_in.numel():
            path = os.path.join(step_dir, theirs[0].name)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(memoryview(buf_in.numpy()))
                f.flush()
                if self.ctx.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self.ctx.fsync:
                fsync_dir(step_dir)
        return len(data)

    def _retain(self) -> None:
        leader = self.ctx.rank == 0 if self.name == "persistent" else self._node_leader()
        if not leader:
            return
        done = [c for c in list_checkpoints(self.root) if c.complete]
        for i, c in enumerate(done):
            if not self.spec.keeps(c.step, newer_committed=len(done) - 1 - i):
                # The manifest goes first: a crash midway leaves an incomplete directory,
                # never a manifest that names deleted files.
                os.remove(os.path.join(c.path, MANIFEST_NAME))
                shutil.rmtree(c.path, ignore_errors=True)
        if done:
            remove_incomplete(self.root, keep_newer_than=done[-1].step)

    def close(self) -> None:
        self._stopping.set()
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=600)


class AsyncWriter:
    """Owns the host buffers, the snapshot thread and the tier workers of one Checkpointer."""

    def __init__(
        self,
        ctx: WriterContext,
        coord_for: Callable[[str], Coordinator],
        events: EventLog,
    ) -> None:
        from .snapshot import Snapshotter

        self.ctx = ctx
        self.events = events
        self.lock = threading.Lock()  # held by the save round and by workers claiming a job
        self.pool = SlotPool(ctx.tiers.host_buffers, pin=torch.cuda.is_available())
        self.snapshotter = Snapshotter()
        self.workers: dict[str, TierWorker] = {}
        t = ctx.tiers
        specs = [("local", t.local, t.local_path(ctx.rank, ctx.world_size) if t.local else ""),
                 ("persistent", t.persistent, (t.persistent.path or ctx.persistent_root) if t.persistent else "")]
        for name, spec, root in specs:
            if spec is not None:
                self.workers[name] = TierWorker(
                    name, spec, root, coord_for(name), ctx, self._done, self.pool.release, self.lock
                )
        self.memory: list[Snapshot] = []  # newest last
        self._jobs: dict[int, _Job] = {}
        self.failures: list[ElastickitError] = []  # not yet reported by wait()

    # -- the save round (the caller holds `self.lock` from status() to submit()) ----------

    def status(self) -> RankStatus:
        by_slot: dict[int, dict[str, Any]] = {}
        for name, w in self.workers.items():
            for j in w.pending:
                by_slot.setdefault(j.snap.slot.index, {"soft": set()})["soft"].add(name)
            if w.current is not None:
                by_slot.setdefault(w.current.snap.slot.index, {"soft": set()})["blocked"] = True
        in_memory = {s.slot.index for s in self.memory}
        steps = {j.snap.slot.index: j.snap.step for j in self._jobs.values()}
        steps.update({s.slot.index: s.step for s in self.memory})
        slots = []
        for sl in self.pool.slots:
            info = by_slot.get(sl.index, {"soft": set()})
            slots.append([sl.index, steps.get(sl.index, -1), bool(info.get("blocked")), sorted(info["soft"]), sl.index in in_memory])
        return RankStatus(
            unclaimed={n: w.unclaimed() for n, w in self.workers.items()},
            slots=slots,
            memory_steps=[s.step for s in self.memory],
        )

    def decide(self, statuses: list[RankStatus]) -> Decision:
        mem = self.ctx.tiers.memory
        return decide(
            statuses,
            max_slots=self.pool.max_slots,
            file_tiers=tuple(self.workers),
            memory_keep=(mem.keep_last or 1) if mem is not None else 0,
        )

    def submit(
        self,
        step: int,
        decision: Decision,
        items: list[Any],
        objects: dict[str, Any],
        rank_object: dict[str, Any],
        plan: SavePlan,
        nbytes: int,
        blocking_s: float,
        eager: frozenset[str] = frozenset(),
    ) -> tuple[Snapshot, Future[str]]:
        """Apply the decision: drop superseded jobs, take the snapshot, queue it on the tiers."""
        assert decision.slot is not None
        for tier, steps in decision.drop.items():
            for job in self.workers[tier].drop(steps):
                self.pool.release(job.snap.slot, tier)
                job.pending.discard(tier)
                job.record["tiers"][tier] = {"status": f"superseded by step {step}"}
                job.record["skipped_tiers"][tier] = f"superseded by step {step} before the tier started it"
                if not job.pending:
                    self._finish(job)
        keep_mem = self.ctx.tiers.memory is not None
        if keep_mem:
            spec = self.ctx.tiers.memory
            keep = (spec.keep_last or 1) if spec else 1
            while len(self.memory) >= keep:
                self.pool.release(self.memory.pop(0).slot, "memory")
        refs = set(decision.tiers) | ({"memory"} if keep_mem else set())
        slot = self.pool.acquire(decision.slot, nbytes, refs)
        snap = self.snapshotter.submit(step, slot, items, objects, rank_object, eager)
        durable: Future[str] = Future()
        record: dict[str, Any] = {
            "step": step,
            "blocking_s": round(blocking_s, 6),
            "bytes": snap.nbytes,
            "skipped_tiers": {},
            "tiers": {},
        }
        job = _Job(snap=snap, plan=plan, durable=durable, pending=set(decision.tiers), record=record)
        if keep_mem:
            self.memory.append(snap)
        self._jobs[step] = job
        if not decision.tiers:
            snap.staged.add_done_callback(lambda _f: self._finish(job))
        for t in decision.tiers:
            self.workers[t].put(job)
        return snap, durable

    def _done(self, job: _Job, tier: str, error: str | None, stats: dict[str, Any]) -> None:
        with self.lock:
            job.pending.discard(tier)
            if error:
                job.errors[tier] = error
                stats["status"] = f"failed: {error}"
                log.warning("elastickit: checkpoint %d on tier %s failed: %s", job.snap.step, tier, error)
            else:
                stats["status"] = "committed"
                job.results[tier] = os.path.join(self.workers[tier].root, step_dir_name(job.snap.step))
            job.record["tiers"][tier] = stats
            last = not job.pending
        if last:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        snap = job.snap
        if snap.staged.done() and snap.staged.exception() is None:
            job.record["snapshot_s"] = round(snap.staged_s - snap.started_s, 6)
        if self.ctx.rank == 0:
            self.events.emit("checkpoint", **job.record)
        if job.errors and not job.results:
            error = ElastickitError(f"checkpoint {snap.step} failed on every tier: {'; '.join(job.errors.values())}")
            self.failures.append(error)
            job.durable.set_exception(error)
        elif not job.durable.done():
            best = job.results.get("persistent") or job.results.get("local") or ("memory" if self.ctx.tiers.memory else "")
            job.durable.set_result(best)
        self._jobs.pop(snap.step, None)

    def skipped(self, step: int, decision: Decision) -> None:
        if self.ctx.rank == 0:
            self.events.emit("checkpoint_skipped", step=step, skipped_tiers=dict(decision.skipped))

    def pending(self) -> list[Future[str]]:
        with self.lock:
            return [j.durable for j in self._jobs.values()]

    def host_bytes(self) -> int:
        return self.pool.total_bytes()

    def close(self) -> None:
        for f in self.pending():
            try:
                f.result()
            except Exception:  # reported already; closing must go on
                pass
        for w in self.workers.values():
            w.close()
        self.snapshotter.close()
