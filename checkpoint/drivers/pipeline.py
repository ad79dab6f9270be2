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
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..coord import Coordinator
from ..errors import ElastickitError, NotDurableError
from ..events import EventLog
from ..lock import LOCK_NAME
from ..paths import is_url
from ..runs import RUN_INFO
from ..storage.files import DirTier
from ..storage.memory import MemoryTier
from ..storage.node import NodeTier
from ..storage.objstore import ObjectRoot
from ..storage.tier import Tier
from ..tiers import TierSpec
from .board import SnapshotBoard
from .clock import SYSTEM, Clock
from .context import WriterContext
from .snapshot import SlotPool, Snapshot, Snapshotter
from .worker import Observer, TierWorker

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


class AsyncWriter:
    """Owns the host buffers, the snapshot thread and the tier workers of one Checkpointer.

    `submit` is local to the process (no store round): it picks a host buffer, starts the copy,
    and offers the snapshot to the tiers, which pull it when they are free. The snapshots and
    who may take them live on the `SnapshotBoard`; this object keeps the saves' outcomes (the
    jobs, under its own lock). `clock` and `observe`: see `worker.TierWorker` (tests).
    """

    def __init__(
        self,
        ctx: WriterContext,
        coord_for: Callable[[str], Coordinator],
        events: EventLog,
        *,
        clock: Clock = SYSTEM,
        observe: Observer | None = None,
    ) -> None:
        self.ctx = ctx
        self.events = events
        spec = ctx.tiers.memory
        self.memory = MemoryTier(spec.keep_last or 1) if spec is not None else None
        self.board = SnapshotBoard(SlotPool(ctx.tiers.host_buffers, pin=torch.cuda.is_available()), self.memory, clock)
        self.snapshotter = Snapshotter()
        self._lock = threading.Lock()  # guards the jobs, the failures and the newest outcome
        self._jobs: list[_Job] = []
        self._failures: list[ElastickitError] = []  # not yet reported by wait()
        # The newest save that every tier is done with: (step, tier -> why it failed there).
        self._newest_outcome: tuple[int, dict[str, str]] | None = None
        self.workers: dict[str, TierWorker] = {}
        for tier, spec in file_tiers(ctx):
            self.workers[tier.name] = TierWorker(
                tier, spec, coord_for(tier.name), ctx, self.board, self._tier_done, clock=clock, observe=observe
            )

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
        start = lambda slot: self.snapshotter.submit(step, slot, items, objects, rank_object, eager)
        job: _Job | None = None

        def started(slot: Any) -> Snapshot:
            # The job is registered before any tier can see the snapshot (under the board's lock).
            nonlocal job
            snap = start(slot)
            record = {"step": step, "blocking_s": round(blocking_s, 6), "bytes": snap.nbytes, "skipped_tiers": {}, "tiers": {}}
            job = _Job(snap=snap, durable=Future(), waiting=set(self.workers), record=record)
            with self._lock:
                self._jobs.append(job)
            return snap

        snap = self.board.offer(nbytes, started, step)
        if snap is None or job is None:
            reason = "no host buffer is free (tiers are still writing earlier checkpoints); raise Tiers.host_buffers to keep more"
            log.warning("elastickit: checkpoint %d skipped: %s", step, reason)
            if self.ctx.rank == 0:
                self.events.emit("checkpoint_skipped", step=step, skipped_tiers={"all": reason})
            return None, _done(""), reason
        if not self.workers:
            done = job
            snap.staged.add_done_callback(lambda _f: self._finish(done))
        return snap, job.durable, ""

    def _tier_done(self, tier: str, snap: Snapshot | None, step: int, error: str | None, stats: dict[str, Any]) -> None:
        """Tier `tier` wrote `step` (or failed): it is done with every save up to that step."""
        finished = []
        with self._lock:
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
        for job in finished:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        snap = job.snap
        if snap.staged.done() and snap.staged.exception() is None:
            job.record["snapshot_s"] = round(snap.staged_s - snap.started_s, 6)
        if self.ctx.rank == 0:
            self.events.emit("checkpoint", **job.record)
        error = None
        if job.errors and not job.results:
            error = ElastickitError(f"checkpoint {snap.step} failed on every tier: {'; '.join(job.errors.values())}")
        with self._lock:
            if error is not None:
                self._failures.append(error)
            if job in self._jobs:
                self._jobs.remove(job)
            if self._newest_outcome is None or snap.step >= self._newest_outcome[0]:
                self._newest_outcome = (snap.step, dict(job.errors))
        if error is not None:
            job.durable.set_exception(error)
        elif not job.durable.done():
            # The slowest tier that committed it (persistent, else local), else memory.
            kept = [job.results[n] for n in self.workers if n in job.results]
            best = kept[-1] if kept else (self.memory.root if self.memory is not None else "")
            job.durable.set_result(best)

    def not_durable(self) -> NotDurableError | None:
        """Why the newest save every tier is done with did not reach every file tier (None if it
        did). Call after `drain`, when that save is the newest one."""
        with self._lock:
            outcome = self._newest_outcome
        if outcome is None or not outcome[1]:
            return None
        step, errors = outcome
        parts = []
        for tier, why in sorted(errors.items()):
            t = self.workers[tier].tier
            kept = t.committed()
            last = f"its newest checkpoint is step {kept[-1]}" if kept else "it holds no checkpoint"
            parts.append(f"the {tier} tier at {t.root} failed ({why}; {last})")
        return NotDurableError(f"checkpoint {step} is not durable: {'; '.join(parts)}", step=step, tiers=tuple(sorted(errors)))

    def flush(self) -> None:
        """Ask every tier to write the newest snapshot now, without resting."""
        self.board.flush(self.workers)

    def drain(self) -> list[BaseException]:
        """Flush, and wait until every save so far is resolved; returns the failures.

        The training thread is blocked meanwhile, so no save arrives: a tier waiting for a step
        that this rank skipped gives up instead of waiting for it (see `TierWorker._agree`).
        """
        with self.board.draining():
            self.flush()
            errors = []
            for f in self.pending():
                try:
                    f.result()
                except BaseException as e:  # returned to the caller
                    errors.append(e)
            return errors

    def tiers(self) -> list[Tier]:
        """Every tier, in the order a checkpoint flows down them (fastest first): memory, then
        the file tiers."""
        return [*([self.memory] if self.memory is not None else []), *(w.tier for w in self.workers.values())]

    def committed(self) -> list[int]:
        """Every step committed on some tier below memory (sorted, unique)."""
        return sorted({s for w in self.workers.values() for s in w.tier.committed()})

    def take_failures(self) -> list[ElastickitError]:
        """The saves no tier committed since the last call (each reported once)."""
        with self._lock:
            out, self._failures = self._failures, []
        return out

    def pending(self) -> list[Future[str]]:
        with self._lock:
            return [j.durable for j in self._jobs]

    def host_bytes(self) -> int:
        return self.board.pool.total_bytes()

    def close(self) -> None:
        self.drain()
        for w in self.workers.values():
            w.stop()
        self.snapshotter.close()


def _done(value: Any = None) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f
