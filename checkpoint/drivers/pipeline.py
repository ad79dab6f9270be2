"""The asynchronous, multi-level writer: a snapshot flows down the tiers in the background.

`save()` is local to its process: it picks a host buffer, starts the copy and offers the
snapshot to the tiers; no store round, no collective. Each file tier (local, persistent) pulls
on its own thread: when it is free it takes the newest snapshot, its ranks agree on one step
(the newest any of them holds; every rank saves the same steps, so the others hold it too or
will a moment later), write it and commit it. The saves it did not take are skipped on that
tier and the event log says so. A slow tier therefore never makes training wait, and the
newest checkpoint always reaches every tier (`flush`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..coord import Coordinator
from ..errors import ElastickitError, NotDurableError
from ..events import EventLog
from ..format.manifest import LayoutRecord, Manifest
from ..lock import LOCK_NAME
from ..storage.objstore import ObjectRoot
from ..paths import is_url
from ..runs import RUN_INFO
from .snapshot import SlotPool, Snapshot
from ..storage.files import DirTier
from ..storage.node import NodeTier
from ..storage.tier import Tier
from .threads import lower_priority
from ..tiers import Tiers, TierSpec
from .writer import PlanCache, SaveRequest, write_checkpoint

log = logging.getLogger("elastickit")


@dataclass(eq=False)
class _Job:
    """One save, from its snapshot until every file tier committed it or moved past it."""

    snap: Snapshot
    durable: Future[str]
    waiting: set[str]  # file tiers that have neither committed it nor committed a newer one
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
    local_root: str = ""  # this rank's directory in the local tier (the run's, see runs.py)
    timeout_s: float = 600.0  # how long a tier waits for the other ranks


def file_tiers(ctx: WriterContext) -> list[tuple[Tier, TierSpec]]:
    """The tiers below memory, in the order a checkpoint flows down them, as storage objects:
    the node-local tier (with buddy copies when `Tiers.peer`), then the persistent one (a
    directory, or an object store for a URL root)."""
    t, out = ctx.tiers, []
    if t.local is not None:
        n = t.node_size(ctx.world_size)
        peer = {"buddy": t.buddy(ctx.rank, ctx.world_size), "ward": t.ward(ctx.rank, ctx.world_size)} if t.peer else {}
        root = ctx.local_root or t.local_path(ctx.rank, ctx.world_size)
        node = NodeTier(
            "local", root, rank=ctx.rank, node_size=n, peer_group=ctx.peer_group, fsync=ctx.fsync, markers=root_markers(root), **peer
        )
        out.append((node, t.local))
    if t.persistent is not None:
        root = t.persistent.path or ctx.persistent_root
        tier: Tier = (
            ObjectRoot(root, t.persistent.storage_options, what="the persistent tier", name="persistent")
            if is_url(root)
            else DirTier("persistent", root, markers=root_markers(root))
        )
        out.append((tier, t.persistent))
    return out


def root_markers(root: str) -> tuple[str, ...]:
    """What the root holds when the job starts and must still hold when it saves (the lock
    file, the run label): their absence means the root vanished (see `DirTier.prepare`)."""
    return tuple(m for m in (LOCK_NAME, RUN_INFO) if os.path.exists(os.path.join(root, m)))


class TierWorker:
    """One file tier (local or persistent) on its own thread, pulling the newest snapshot.

    When it is free (and has rested, see `TierSpec.max_busy_fraction`), the worker pins the
    newest snapshot of its process and its ranks agree on one step: the newest any of them
    holds. Every rank saves the same steps, so a rank behind holds it a moment later (the writer
    pins it for the worker as it arrives). The saves in between are skipped by this tier, and the
    event log says so. Training never takes part: `save()` only hands its snapshot over.
    """

    def __init__(self, tier: Tier, spec: TierSpec, coord: Coordinator, ctx: WriterContext, writer: AsyncWriter) -> None:
        self.tier = tier  # where this worker's checkpoints go: any storage.tier.Tier
        self.name = tier.name
        self.spec = spec
        self.root = tier.root
        self.coord = coord
        self.ctx = ctx
        self.writer = writer
        self.plans = PlanCache()
        self.flush = False  # commit the newest snapshot now, without resting
        # A rank behind the others waits for this step: the writer pins its save for this tier.
        self.want: int | None = None
        self.held: list[Snapshot] = []
        self._tried: Snapshot | None = None  # the last snapshot this tier wrote (or failed to)
        self._rest_until = 0.0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"elastickit-{self.name}", daemon=True)
        self._thread.start()

    def _next(self) -> Snapshot | None:
        """Wait for a snapshot to write and pin it; None to stop (call with the writer's lock)."""
        cond = self.writer.cond
        while True:
            newest = self.writer.newest
            fresh = newest is not None and newest is not self._tried
            if not fresh:
                self.flush = False
                if self._stop:
                    return None
                cond.wait()
                continue
            wait = self._rest_until - time.monotonic()
            if self.flush or self._stop or wait <= 0:
                assert newest is not None
                newest.slot.refs.add(self.name)
                return newest
            cond.wait(wait)

    def _agree(self, mine: Snapshot) -> tuple[Snapshot | None, int]:
        """The step every rank writes and this rank's snapshot of it, pinned; (None, step) when
        some rank no longer holds it (rare: a rank a full step ahead of another), to try again."""
        cond = self.writer.cond
        snap: Snapshot | None = None
        try:
            got = self.coord.all_gather({"step": mine.step}, phase=f"{self.name} tier: pick a checkpoint")
            target = max(g["step"] for g in got)
            deadline = time.monotonic() + self.ctx.timeout_s
            with cond:
                snap = self.writer.find(target, [mine])
                if snap is None and (self.writer.newest is None or self.writer.newest.step < target):
                    # Behind the others: this rank saves `target` within a step or so.
                    self.want, self.held = target, []
                    while not self.held and not self._stop and time.monotonic() < deadline:
                        newest = self.writer.newest
                        if newest is not None and newest.step > target:
                            break  # it skipped `target` (no free buffer): the ranks try again
                        if self.writer.draining:
                            break  # no save arrives while the training thread drains
                        cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                    snap = self.held[0] if self.held else None
                    self.want, self.held = None, []
                elif snap is not None and snap is not mine:
                    snap.slot.refs.add(self.name)
                if snap is not mine:
                    self._unpin([mine])
            have = self.coord.all_gather(
                {"ok": snap is not None, "draining": self.writer.draining},
                phase=f"{self.name} tier: confirm step {target}",
            )
        except BaseException:
            with cond:
                self._unpin([s for s in {id(mine): mine, id(snap): snap}.values() if s is not None])
            raise
        if not all(h["ok"] for h in have):
            if snap is not None:
                with cond:
                    self._unpin([snap])
            missing = [r for r, h in enumerate(have) if not h["ok"]]
            if any(h["draining"] for h in have):
                # Nothing newer will come before the drain ends: trying again would not help.
                raise ElastickitError(
                    f"step {target} is not held by rank(s) {missing} (they skipped that save: no free "
                    "host buffer), and no newer save came; this tier keeps its previous checkpoint"
                )
            return None, target
        return snap, target

    def _unpin(self, snaps: list[Snapshot]) -> None:
        for s in snaps:
            self.writer.pool.release(s.slot, self.name)

    def _run(self) -> None:
        lower_priority()
        cond = self.writer.cond
        while True:
            with cond:
                mine = self._next()
            if mine is None:
                return
            t0 = time.monotonic()
            cpu0 = time.thread_time()
            stats: dict[str, Any] = {}
            snap, target, error = None, mine.step, None
            try:
                snap, target = self._agree(mine)
                if snap is None:
                    log.info("elastickit: tier %s: a rank no longer holds step %d; taking a newer one", self.name, target)
                    with cond:
                        self._tried = None  # try again at once, with the newest
                    continue
                stats["queued_s"] = round(time.monotonic() - t0, 6)
                t1 = time.monotonic()
                manifest = self._write(snap, target)  # overlaps the copy: waits item by item
                snap.staged.result()
                stats["persist_s"] = round(time.monotonic() - t1, 6)
                if manifest is not None:
                    stats["stored_bytes"] = sum(f.size_bytes for f in manifest.files.values())
                    logical = manifest.total_bytes
                    stats["compression_ratio"] = round(logical / stats["stored_bytes"], 3) if stats["stored_bytes"] else None
                    stats.update(self.tier.after_commit(manifest))  # a node-local tier's copies
                if self.tier.retains(self.ctx.rank):
                    self.tier.retain(self.spec.keeps)
            except ElastickitError as e:
                error = str(e)
            except Exception as e:  # a tier failure is reported, never raised into training
                error = f"{type(e).__name__}: {e}"
            if error is not None and self.tier.retains(self.ctx.rank):
                self._discard_partial(target)
            cpu_s = time.thread_time() - cpu0
            stats["cpu_s"] = round(cpu_s, 6)
            with cond:
                if snap is not None:
                    self._unpin([snap])
                self._tried = snap if snap is not None else mine
                self._rest_until = time.monotonic() + self._rest_s(cpu_s, failed=error is not None)
            self.writer.tier_done(self.name, snap, target, error, stats)

    def _rest_s(self, cpu_s: float, *, failed: bool) -> float:
        """Stay under `max_busy_fraction` of a core (and do not retry a failure at once)."""
        f = self.spec.max_busy_fraction
        rest = cpu_s * (1 / f - 1) if f < 1 else 0.0
        return max(rest, 1.0) if failed else rest

    def _write(self, snap: Snapshot, step: int) -> Manifest | None:
        req = SaveRequest(
            root=self.root,
            step=step,
            items=snap.items,
            objects=snap.objects,
            rank_object=snap.rank_object,
            layout=self.ctx.layout,
            rules=self.ctx.rules,
            framework=self.ctx.framework,
            fsync=self.ctx.fsync,
            zstd_level=self.spec.zstd_level,
            zstd_threads=self.spec.zstd_threads,
            before_item=snap.wait_item,
        )
        # Only a tier whose other ranks use the manifest (a node's copy, peer copies) shares it.
        return write_checkpoint(req, self.coord, plans=self.plans, share=self.tier.shares_manifest, tier=self.tier)

    def _discard_partial(self, step: int) -> None:
        """A failed save's leftovers go (every rank is past writing: the failure was agreed in a
        store round), so that a full disk is not filled further by the attempts."""
        try:
            self.tier.discard_partial(step)
        except Exception as e:  # noqa: BLE001 - cleaning up must not hide the save's failure
            log.warning("elastickit: tier %s: cannot remove the failed step %d (%s)", self.name, step, e)

    def stop(self) -> None:
        with self.writer.cond:
            self._stop = True
            self.writer.cond.notify_all()
        self._thread.join(timeout=600)

    def committed(self) -> list[int]:
        """The steps this tier holds committed (in this rank's directory), oldest first."""
        return self.tier.committed()


class AsyncWriter:
    """Owns the host buffers, the snapshot thread and the tier workers of one Checkpointer.

    `submit` is local to the process (no store round): it picks a host buffer, starts the copy,
    and offers the snapshot to the tiers, which pull it when they are free.
    """

    def __init__(
        self,
        ctx: WriterContext,
        coord_for: Callable[[str], Coordinator],
        events: EventLog,
    ) -> None:
        from .snapshot import Snapshotter

        self.ctx = ctx
        self.events = events
        self.cond = threading.Condition()  # guards slot references, `newest`, `memory`, jobs
        self.pool = SlotPool(ctx.tiers.host_buffers, pin=torch.cuda.is_available())
        self.snapshotter = Snapshotter()
        self.memory: list[Snapshot] = []  # what the memory tier retains, newest last
        self.newest: Snapshot | None = None  # the snapshot a free tier takes next
        self._jobs: list[_Job] = []
        self.failures: list[ElastickitError] = []  # not yet reported by wait()
        # The newest save that every tier is done with: (step, tier -> why it failed there).
        self.newest_outcome: tuple[int, dict[str, str]] | None = None
        self.draining = False  # the training thread waits in drain(): no save will arrive
        self.workers: dict[str, TierWorker] = {}
        for tier, spec in file_tiers(ctx):
            self.workers[tier.name] = TierWorker(tier, spec, coord_for(tier.name), ctx, self)

    def submit(
        self,
        step: int,
        items: list[Any],
        objects: dict[str, Any],
        rank_object: dict[str, Any] | Callable[[], dict[str, Any]],
        nbytes: int,
        blocking_s: float,
        eager: frozenset[str] = frozenset(),
    ) -> tuple[Snapshot | None, Future[str], str]:
        """Take a snapshot of `items` into a free host buffer and offer it to the tiers.

        Returns (snapshot, durable, "") or, when every host buffer is still being written by a
        tier, (None, a done future, why the save is skipped).
        """
        keep_mem = self.ctx.tiers.memory is not None
        with self.cond:
            index = self._free_slot()
            if index is None:
                reason = "no host buffer is free (tiers are still writing earlier checkpoints); raise Tiers.host_buffers to keep more"
                log.warning("elastickit: checkpoint %d skipped: %s", step, reason)
                if self.ctx.rank == 0:
                    self.events.emit("checkpoint_skipped", step=step, skipped_tiers={"all": reason})
                return None, _done(""), reason
            holders = [w for w in self.workers.values() if w.want == step]
            refs = {"newest", *(w.name for w in holders)} | ({"memory"} if keep_mem else set())
            slot = self.pool.acquire(index, nbytes, refs)
            snap = self.snapshotter.submit(step, slot, items, objects, rank_object, eager)
            for w in holders:
                w.held.append(snap)
            if self.newest is not None:
                self.pool.release(self.newest.slot, "newest")
            self.newest = snap
            if keep_mem:
                self.memory.append(snap)
                while len(self.memory) > self._memory_keep():
                    self.pool.release(self.memory.pop(0).slot, "memory")
            record: dict[str, Any] = {
                "step": step,
                "blocking_s": round(blocking_s, 6),
                "bytes": snap.nbytes,
                "skipped_tiers": {},
                "tiers": {},
            }
            job = _Job(snap=snap, durable=Future(), waiting=set(self.workers), record=record)
            self._jobs.append(job)
            self.cond.notify_all()
        if not self.workers:
            snap.staged.add_done_callback(lambda _f: self._finish(job))
        return snap, job.durable, ""

    def find(self, step: int, also: list[Snapshot]) -> Snapshot | None:
        """The newest snapshot of `step` still in a host buffer (call with the lock)."""
        for snap in reversed([*also, *self._live()]):
            if snap.step == step and snap.slot.refs:
                return snap
        return None

    def _free_slot(self) -> int | None:
        """The host buffer for a new snapshot (call with the lock), preferring warm memory.

        First a buffer this save releases anyway (the snapshot it replaces as the newest, or
        the memory tier's oldest beyond `keep_last`) when no tier holds it: its pages are
        mapped already. Then a free buffer, a new one, or the oldest that only the memory tier
        still holds. None when tiers are writing from every buffer.
        """
        outgoing = self.memory[: max(0, len(self.memory) - self._memory_keep() + 1)]
        if self.newest is not None and self.newest not in self.memory:
            outgoing.append(self.newest)
        for snap in outgoing:
            if snap.slot.refs <= {"memory", "newest"}:
                return self._evict(snap)
        for sl in self.pool.slots:
            if not sl.refs:
                return sl.index
        if self.pool.count() < self.pool.max_slots:
            return self.pool.count()
        for snap in self._live():
            if snap.slot.refs <= {"memory", "newest"}:
                return self._evict(snap)
        return None

    def _live(self) -> list[Snapshot]:
        """The snapshots still in host buffers for the memory tier or as the newest, oldest first."""
        return [*self.memory, *([self.newest] if self.newest is not None and self.newest not in self.memory else [])]

    def _memory_keep(self) -> int:
        spec = self.ctx.tiers.memory
        return max(1, spec.keep_last or 1) if spec is not None else 0

    def _evict(self, snap: Snapshot) -> int:
        """Take `snap`'s buffer back from the memory tier (call with the lock)."""
        if snap in self.memory:
            self.memory.remove(snap)
        if snap is self.newest:
            self.newest = None
        snap.slot.refs.clear()
        return snap.slot.index

    def tier_done(self, tier: str, snap: Snapshot | None, step: int, error: str | None, stats: dict[str, Any]) -> None:
        """Tier `tier` wrote `step` (or failed): it is done with every save up to that step."""
        finished = []
        with self.cond:
            for job in list(self._jobs):
                if tier not in job.waiting or job.snap.step > step:
                    continue
                job.waiting.discard(tier)
                if job.snap is snap or (snap is None and job.snap.step == step):
                    if error:
                        job.errors[tier] = error
                        job.record["tiers"][tier] = {**stats, "status": f"failed: {error}"}
                        log.warning("elastickit: checkpoint %d on tier %s failed: %s", step, tier, error)
                    else:
                        job.record["tiers"][tier] = {**stats, "status": "committed"}
                        job.results[tier] = self.workers[tier].tier.step_where(step)
                else:
                    job.record["tiers"][tier] = {"status": f"superseded by step {step}"}
                    job.record["skipped_tiers"][tier] = f"superseded by step {step} (the tier was busy)"
                if not job.waiting:
                    self._jobs.remove(job)
                    finished.append(job)
            self.cond.notify_all()
        for job in finished:
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
        with self.cond:
            if job in self._jobs:
                self._jobs.remove(job)
            if self.newest_outcome is None or snap.step >= self.newest_outcome[0]:
                self.newest_outcome = (snap.step, dict(job.errors))

    def not_durable(self) -> NotDurableError | None:
        """Why the newest save every tier is done with did not reach every file tier (None if it
        did). Call after `drain`, when that save is the newest one."""
        with self.cond:
            outcome = self.newest_outcome
        if outcome is None or not outcome[1]:
            return None
        step, errors = outcome
        parts = []
        for tier, why in sorted(errors.items()):
            root = self.workers[tier].root
            kept = self.workers[tier].committed()
            last = f"its newest checkpoint is step {kept[-1]}" if kept else "it holds no checkpoint"
            parts.append(f"the {tier} tier at {root} failed ({why}; {last})")
        return NotDurableError(f"checkpoint {step} is not durable: {'; '.join(parts)}", step=step, tiers=tuple(sorted(errors)))

    def flush(self) -> None:
        """Ask every tier to write the newest snapshot now, without resting."""
        with self.cond:
            for w in self.workers.values():
                w.flush = True
            self.cond.notify_all()

    def drain(self) -> list[BaseException]:
        """Flush, and wait until every save so far is resolved; returns the failures.

        The training thread is blocked meanwhile, so no save arrives: a tier waiting for a step
        that this rank skipped gives up instead of waiting for it (see `TierWorker._agree`).
        """
        with self.cond:
            self.draining = True
        try:
            self.flush()
            errors = []
            for f in self.pending():
                try:
                    f.result()
                except BaseException as e:  # returned to the caller
                    errors.append(e)
            return errors
        finally:
            with self.cond:
                self.draining = False

    def tiers(self) -> list[Tier]:
        """The tiers below memory, in the order a checkpoint flows down them (fastest first)."""
        return [w.tier for w in self.workers.values()]

    def snapshots(self) -> list[Snapshot]:
        """What the memory tier holds, oldest first."""
        with self.cond:
            return list(self.memory)

    def committed(self) -> list[int]:
        """Every step committed on some tier below memory (sorted, unique)."""
        return sorted({s for w in self.workers.values() for s in w.committed()})

    def take_failures(self) -> list[ElastickitError]:
        """The saves no tier committed since the last call (each reported once)."""
        with self.cond:
            out, self.failures = self.failures, []
        return out

    def pending(self) -> list[Future[str]]:
        with self.cond:
            return [j.durable for j in self._jobs]

    def host_bytes(self) -> int:
        return self.pool.total_bytes()

    def close(self) -> None:
        self.drain()
        for w in self.workers.values():
            w.stop()
        self.snapshotter.close()


def _done(value: Any = None) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f
