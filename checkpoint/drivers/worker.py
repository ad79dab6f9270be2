"""One file tier on its own thread, pulling the newest snapshot from the board.

When it is free (and has rested, see `TierSpec.max_busy_fraction`), the worker takes the newest
snapshot of its process and its ranks agree on one step: the newest any of them holds. Every
rank saves the same steps, so a rank behind holds it a moment later (the board pins it for the
worker as it arrives). The saves in between are skipped by this tier, and the event log says
so. Training never takes part: `save()` only hands its snapshot over.

The worker reads time from its `Clock` and says what it does through `observe(tier, what,
step)`: "agreeing" (it took its snapshot of `step`, -1 for none, and joins its ranks' round),
"resting" (the snapshot of `step` waits until the tier has rested; said again each
time the tier looks and rests on), "waiting" (this rank waits for `step`, which another rank
holds), "retry" (a rank no
longer holds the agreed `step`: the ranks take a newer one), "done" (the tier wrote `step` or
failed to, and reported it), "answered" (a flushed or stopping tier told its ranks that this rank
skipped `step`, and no rank had anything fresh to write). Tests drive the schedule with a
`ManualClock` and wait on these.

A rank that skipped a save (no free host buffer) while its tier was busy holds nothing fresh
afterwards, so its tier would idle while the other ranks' tiers wait in a round for that step.
Flushed (`wait()`, `restore()`) or stopping (`close()`), such a tier joins one more round to
say so, and the ranks give that step up at once instead of waiting out their timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..coord import Coordinator
from ..errors import ElastickitError
from ..format.manifest import Manifest
from ..plan.save import PlanCache
from ..storage.tier import Tier
from ..tiers import TierSpec
from .board import SnapshotBoard, Taken
from .clock import Clock
from .context import WriterContext
from .snapshot import Snapshot
from .threads import lower_priority
from .writer import SaveRequest, write_checkpoint

log = logging.getLogger("elastickit")

#: observe(tier, what, step): see the module docstring.
Observer = Callable[[str, str, int], None]
#: report(tier, snapshot written (None: none), step, error, stats): the tier is done with `step`.
Report = Callable[[str, "Snapshot | None", int, "str | None", "dict[str, Any]"], None]


class TierWorker:
    """One file tier (local or persistent) on its own thread (see the module docstring)."""

    def __init__(
        self,
        tier: Tier,
        spec: TierSpec,
        coord: Coordinator,
        ctx: WriterContext,
        board: SnapshotBoard,
        report: Report,
        *,
        clock: Clock,
        observe: Observer | None = None,
    ) -> None:
        self.tier = tier  # where this worker's checkpoints go: any storage.tier.Tier
        self.name = tier.name
        self.spec = spec
        self._coord = coord
        self._ctx = ctx
        self._board = board
        self._report = report
        self._clock = clock
        self._observe = observe
        self._plans = PlanCache()
        self._tried: Snapshot | None = None  # the last snapshot this tier wrote (or failed to)
        self._answered = -1  # the newest step this rank skipped that its ranks know of
        self._rest_until = float("-inf")
        self._thread = threading.Thread(target=self._run, name=f"elastickit-{self.name}", daemon=True)
        self._thread.start()

    def _note(self, what: str, step: int) -> None:
        if self._observe is not None:
            self._observe(self.name, what, step)

    def _agree(self, taken: Taken) -> tuple[Snapshot | None, int]:
        """The step every rank writes and this rank's snapshot of it, pinned. (None, step) when
        some rank no longer holds it but a newer save is coming (rare: a rank a full step ahead
        of another), to try again; (None, -1) when no rank had anything fresh (a round of stale
        takes only: nothing to write)."""
        board, mine, snap = self._board, taken.snap, None
        try:
            got = self._coord.all_gather(
                {"step": mine.step if mine is not None else -1, "fresh": taken.fresh},
                phase=f"{self.name} tier: pick a checkpoint",
            )
            self._answered = max(self._answered, taken.skipped)  # every rank has seen it now
            if not any(g["fresh"] for g in got):
                if mine is not None:
                    board.release(self.name, [mine])
                return None, -1
            target = max(g["step"] for g in got)
            deadline = self._clock.now() + self._ctx.timeout_s
            snap = board.find_or_wait(self.name, target, mine, deadline, lambda: self._note("waiting", target))
            have = self._coord.all_gather(
                {"ok": snap is not None, "gone": snap is None and board.gone(self.name, target)},
                phase=f"{self.name} tier: confirm step {target}",
            )
        except BaseException:
            board.release(self.name, [s for s in {id(mine): mine, id(snap): snap}.values() if s is not None])
            raise
        if not all(h["ok"] for h in have):
            if snap is not None:
                board.release(self.name, [snap])
            missing = [r for r, h in enumerate(have) if not h["ok"]]
            if any(h["gone"] for h in have):
                # It skipped the save, or nothing newer comes before the drain or the stop ends:
                # trying again would not help.
                raise ElastickitError(
                    f"step {target} is not held by rank(s) {missing} (they skipped that save: no free "
                    "host buffer), and no newer save came; this tier keeps its previous checkpoint"
                )
            return None, target
        return snap, target

    def _run(self) -> None:
        lower_priority()
        clock = self._clock
        while True:
            taken = self._board.take(
                self.name, self._tried, self._rest_until, lambda step: self._note("resting", step),
                max(self._answered, self._tried.step if self._tried is not None else -1),
            )
            if taken is None:
                return
            mine = taken.snap
            t0 = clock.now()
            cpu0 = clock.thread_cpu()
            stats: dict[str, Any] = {}
            snap, target, error = None, mine.step if mine is not None else -1, None
            self._note("agreeing", target)
            try:
                snap, target = self._agree(taken)
                if snap is None and target < 0:
                    self._note("answered", taken.skipped)
                    continue  # nobody had anything fresh: this rank's skip is known to all
                if snap is None:
                    log.info("elastickit: tier %s: a rank no longer holds step %d; taking a newer one", self.name, target)
                    self._tried = None  # try again at once, with the newest
                    self._note("retry", target)
                    continue
                stats["queued_s"] = round(clock.now() - t0, 6)
                t1 = clock.now()
                manifest = self._write(snap, target)  # overlaps the copy: waits item by item
                snap.staged.result()
                stats["persist_s"] = round(clock.now() - t1, 6)
                if manifest is not None:
                    stats["stored_bytes"] = sum(f.size_bytes for f in manifest.files.values())
                    logical = manifest.total_bytes
                    stats["compression_ratio"] = round(logical / stats["stored_bytes"], 3) if stats["stored_bytes"] else None
                    stats.update(self.tier.after_commit(manifest))  # a node-local tier's copies
                if self.tier.retains(self._ctx.rank):
                    self.tier.retain(self.spec.keeps)
            except ElastickitError as e:
                error = str(e)
            except Exception as e:  # a tier failure is reported, never raised into training
                error = f"{type(e).__name__}: {e}"
            if error is not None and target >= 0 and self.tier.retains(self._ctx.rank):
                self._discard_partial(target)
            cpu_s = clock.thread_cpu() - cpu0
            stats["cpu_s"] = round(cpu_s, 6)
            if snap is not None:
                self._board.release(self.name, [snap])
            if snap is not None or mine is not None:
                self._tried = snap if snap is not None else mine
            self._rest_until = clock.now() + self._rest_s(cpu_s, failed=error is not None)
            self._report(self.name, snap, target, error, stats)
            self._note("done", target)

    def _rest_s(self, cpu_s: float, *, failed: bool) -> float:
        """Stay under `max_busy_fraction` of a core (and do not retry a failure at once)."""
        f = self.spec.max_busy_fraction
        rest = cpu_s * (1 / f - 1) if f < 1 else 0.0
        return max(rest, 1.0) if failed else rest

    def _write(self, snap: Snapshot, step: int) -> Manifest | None:
        ctx = self._ctx
        req = SaveRequest(
            root=self.tier.root,
            step=step,
            items=snap.items,
            objects=snap.objects,
            rank_object=snap.rank_object,
            layout=ctx.layout,
            rules=ctx.rules,
            framework=ctx.framework,
            fsync=ctx.fsync,
            zstd_level=self.spec.zstd_level,
            zstd_threads=self.spec.zstd_threads,
            before_item=snap.wait_item,
        )
        # Only a tier whose other ranks use the manifest (a node's copy, peer copies) shares it.
        return write_checkpoint(req, self._coord, plans=self._plans, share=self.tier.shares_manifest, tier=self.tier)

    def _discard_partial(self, step: int) -> None:
        """A failed save's leftovers go (every rank is past writing: the failure was agreed in a
        store round), so that a full disk is not filled further by the attempts."""
        try:
            self.tier.discard_partial(step)
        except Exception as e:  # noqa: BLE001 - cleaning up must not hide the save's failure
            log.warning("elastickit: tier %s: cannot remove the failed step %d (%s)", self.name, step, e)

    def stop(self) -> None:
        """End the thread once the tier has nothing fresh to write."""
        self._board.stop(self.name)
        self._thread.join(timeout=600)
