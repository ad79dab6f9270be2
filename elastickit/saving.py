"""The save side of a Checkpointer: when a checkpoint is due, what it captures, and the writer
that carries its snapshot down the tiers (`checkpoint.drivers.pipeline.AsyncWriter`).

`Checkpointer` keeps the public surface; this object does the work behind `save`, `fence`,
`wait`, `latest` and `close`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

import elastickit
from elastickit.capture import StateCapture
from elastickit.checkpoint.drivers.context import WriterContext
from elastickit.checkpoint.drivers.pipeline import AsyncWriter
from elastickit.checkpoint.errors import NotDurableError
from elastickit.checkpoint.events import EventLog
from elastickit.checkpoint.format.manifest import LayoutRecord
from elastickit.checkpoint.policy import IntervalPolicy
from elastickit.checkpoint.tiers import Tiers
from elastickit.handle import SaveHandle
from elastickit.rng import rng_capture, rng_encode
from elastickit.schedule import SaveSchedule
from elastickit.session import Session

log = logging.getLogger("elastickit")


def resolve_tiers(tiers: Tiers | None, keep_last: int | None) -> Tiers:
    """The tiers a Checkpointer writes: `tiers` (default: memory, then the root) with the
    `keep_last` shorthand applied to the persistent tier."""
    tiers = tiers or Tiers()
    if keep_last is None:
        return tiers
    if tiers.persistent is None:
        raise ValueError("keep_last applies to the persistent tier, which these tiers leave out")
    return dataclasses.replace(tiers, persistent=dataclasses.replace(tiers.persistent, keep_last=keep_last))


class SaveDriver:
    """Saves of one Checkpointer (see the module docstring)."""

    def __init__(
        self,
        *,
        root: str,
        session: Session,
        tiers: Tiers,
        layout: LayoutRecord,
        rules: Any,
        capture: StateCapture,
        policy: IntervalPolicy,
        events: EventLog,
        rank: int,
        world_size: int,
        rng: bool,
        fsync: bool,
        timeout_s: float,
    ) -> None:
        ctx = WriterContext(
            rank=rank,
            world_size=world_size,
            tiers=tiers,
            persistent_root=root,
            local_root=session.local_root or "",
            layout=layout,
            rules=tuple(rules.to_json()) if rules is not None else (),
            framework={"torch": torch.__version__, "elastickit": elastickit.__version__},
            fsync=fsync,
            peer_group=session.peer_group,
            timeout_s=timeout_s,
        )
        self.writer = AsyncWriter(ctx, session.coord_for, events)
        self.schedule = SaveSchedule(policy, session.coord, rank=rank, world_size=world_size)
        self.capture = capture
        self._rng = rng
        self._last_snap: Any = None
        self._reported: int | None = None  # the step whose failure wait() or close() raised

    def fence(self) -> None:
        """Block until the newest snapshot is copied."""
        snap = self._last_snap
        if snap is not None and not snap.staged.done():
            snap.staged.result()

    def save(self, step: int, state: Mapping[str, Any], *, force: bool, lazy: str) -> SaveHandle:
        self.schedule.settle()  # a time-based policy: the previous round set the next due step
        self.schedule.called(step)
        if not (force or self.schedule.due(step)):
            return SaveHandle.not_taken(step, "not due")
        t0 = time.perf_counter()
        self.fence()  # one snapshot in flight at a time keeps the copy order simple
        cap = self.capture.capture(state)
        self.capture.install_fence(state, self.fence)
        rank_object: Any = {}
        if self._rng:
            raw = rng_capture()  # encoded only if a file tier takes this snapshot
            rank_object = lambda: {"rng": rng_encode(raw)}
        snap, durable, reason = self.writer.submit(
            step, cap.items, cap.objects, rank_object, cap.nbytes, time.perf_counter() - t0, cap.eager
        )
        self.schedule.saved(step, time.perf_counter() - t0)
        if snap is None:
            return SaveHandle.not_taken(step, reason)
        self._last_snap = snap
        if lazy == "never":
            snap.staged.result()
        return SaveHandle(step=step, scheduled=True, staged=snap.staged, durable=durable)

    def wait(self) -> None:
        """Block until every checkpoint taken so far is durable; raise the first failure."""
        self.schedule.settle()
        errors = self.writer.drain()
        failures = self.writer.take_failures()
        first = self.not_durable() or (errors[0] if errors else (failures[0] if failures else None))
        if first is not None:
            raise first

    def not_durable(self) -> NotDurableError | None:
        """Why the newest checkpoint is not on every tier, once (wait() and close() both ask)."""
        error = self.writer.not_durable()
        if error is None or self._reported == error.step:
            return None
        self._reported = error.step
        return error

    def latest(self) -> int | None:
        steps = self.writer.committed()
        return max(steps) if steps else None

    def close(self) -> NotDurableError | None:
        """Settle the schedule, make the newest checkpoint durable, stop the threads; returns
        why the newest checkpoint is not durable (None: it is, or wait() said so already)."""
        try:
            self.schedule.settle()
        except BaseException as e:  # noqa: BLE001 - the round failed; closing must go on
            log.warning("elastickit: the last schedule round failed: %s", e)
        self.schedule.close()
        self.writer.close()
        return self.not_durable()

