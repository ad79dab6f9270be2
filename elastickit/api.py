"""The public API: `Checkpointer` (DESIGN.md section 7a).

    ck = ek.Checkpointer("runs/exp1/ckpt", every=100)
    step = ck.restore({"model": model, "optim": optimizer, "data": loader})   # 0 if none
    for step in range(step, total):
        ...
        optimizer.step()
        ck.save(step + 1, {"model": model, "optim": optimizer, "data": loader})
    ck.close()

`save` returns at once: it records references to the live tensors and a background thread
copies them into reusable host buffers while the next forward and backward run; the only wait
is a fence before the next `optimizer.step()` (an optimizer step pre-hook). The snapshot then
flows down the tiers (memory, local, peer, persistent) in the background (DESIGN.md section 4).

The same object works in one process and under torchrun (every rank constructs it with the same
arguments, in the same order). Restore reshards when the running layout differs from the saved one.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Mapping
from typing import Any

from elastickit.capture import LAZY_MODES, StateCapture
from elastickit.checkpoint.errors import ElastickitError, RequestError
from elastickit.checkpoint.paths import location
from elastickit.checkpoint.policy import IntervalPolicy
from elastickit.checkpoint.tiers import Tiers, TierSpec
from elastickit.handle import SaveHandle
from elastickit.preempt import check_grace, install_sigterm
from elastickit.restoring import RestoreReport, Sources, restore_state
from elastickit.saving import SaveDriver, resolve_tiers
from elastickit.session import (
    event_log_path,
    layout_record,
    open_event_log,
    open_session,
    rank_and_world,
)

log = logging.getLogger("elastickit")

__all__ = ["Checkpointer", "IntervalPolicy", "SaveHandle", "TierSpec", "Tiers"]


class Checkpointer:
    """Saves and restores a training state (DESIGN.md section 7a).

    Args:
        root: the checkpoint root directory (the persistent tier unless `tiers` says otherwise),
            or an object-storage URL (`s3://bucket/run`, `gs://...`, `az://...`: any fsspec URL
            whose backend is installed; credentials and endpoint from the environment, or
            `Tiers(persistent=TierSpec(storage_options={...}))`).
        every: checkpoint every N steps (default 1; `save` is cheap on other steps).
        every_seconds: checkpoint about every T seconds of training instead.
        auto: choose the interval by Young/Daly from the measured cost and the MTBF.
        mtbf_s: mean time between failures for `auto` (default: learned from the event log,
            else 3 hours).
        tiers: where checkpoints go (default: host memory, then `root`).
        layout: the running parallel layout (a ParallelLayout, a DeviceMesh or a dict of axis
            sizes), recorded in the manifest.
        rules: resharding rules (an `elastickit.reshard` RuleSet) for tensors whose placement
            alone does not say how they relate to their logical tensors.
        rng: save and restore each rank's RNG states (torch, CUDA, python, numpy).
        fsync: make every checkpoint durable before it commits.
        keep_last: shorthand for the persistent tier's retention.
        lazy: "auto" copies in the background what only an optimizer step changes (parameters
            and optimizer state, fenced by a step pre-hook) and everything else at once;
            "always" copies everything in the background (call `fence()` before changing any
            saved tensor yourself); "never" copies everything before `save` returns.
        events: the event log path (default: `<root>/events.jsonl`; none for a URL root, where
            it must be a local path given here).
        timeout_s: how long a rank waits for the others in a save or restore.
        sigterm_grace_s: on SIGTERM (a scheduler's preemption notice), save the last step
            trained at the next `save` call, make it durable, and exit, all within this many
            seconds of the signal (see `elastickit.preempt`; None: SIGTERM is left alone). Make
            the Checkpointer on the main thread, and call `save` every step.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        every: int | None = None,
        every_seconds: float | None = None,
        auto: bool = False,
        mtbf_s: float | None = None,
        tiers: Tiers | None = None,
        layout: Any = None,
        rules: Any = None,
        rng: bool = True,
        fsync: bool = True,
        keep_last: int | None = None,
        lazy: str = "auto",
        events: str | None = None,
        timeout_s: float = 600.0,
        sigterm_grace_s: float | None = None,
    ) -> None:
        check_grace(sigterm_grace_s)
        self.root = location(root, what="the Checkpointer root")
        events = event_log_path(self.root, events)
        try:
            self.policy = IntervalPolicy(
                every=every, every_seconds=every_seconds, auto=auto, mtbf_s=mtbf_s, events_path=events
            )
            tiers = resolve_tiers(tiers, keep_last)
        except ValueError as e:
            raise RequestError(f"Checkpointer: {e}") from e
        if lazy not in LAZY_MODES:
            raise RequestError(f"lazy must be 'auto', 'always' or 'never', got {lazy!r}")
        self.tiers, self.lazy, self.rng = tiers, lazy, rng
        self.rank, self.world_size = rank_and_world()
        layout = layout_record(layout, self.world_size)
        capture = StateCapture(lazy, rules.piece_rule(layout, self.rank) if rules is not None else None)
        self._session = open_session(
            self.root, rank=self.rank, world_size=self.world_size, tiers=tiers, events=events, timeout_s=timeout_s
        )
        self.events = open_event_log(self.root, events, rank=self.rank)
        self._saves = SaveDriver(
            root=self.root, session=self._session, tiers=tiers, layout=layout, rules=rules, capture=capture,
            policy=self.policy, events=self.events, rank=self.rank, world_size=self.world_size, rng=rng,
            fsync=fsync, timeout_s=timeout_s,
        )
        self._closed = False
        self.last_restore: RestoreReport | None = None  # what the last restore loaded and skipped
        self._sigterm = install_sigterm(
            sigterm_grace_s,
            world_size=self.world_size,
            key=f"elastickit/{self._session.nonce}/sigterm",
            flush=self._saves.writer.flush,
            newest_durable=self.latest,
        )
        # A script that ends without close() must not lose its last checkpoint: the background
        # threads are daemons, so wait for them at interpreter exit (close() unregisters this).
        atexit.register(self._close_at_exit)

    def _check_open(self) -> None:
        if self._closed:
            raise RequestError("this Checkpointer is closed; create a new one")

    def due(self, step: int) -> bool:
        """Whether the policy takes a checkpoint at `step` (the same answer on every rank)."""
        return self._saves.schedule.due(step)

    def fence(self) -> None:
        """Block until the newest snapshot is copied (called before each optimizer step)."""
        self._saves.fence()

    def save(self, step: int, state: Mapping[str, Any], *, force: bool = False) -> SaveHandle:
        """Checkpoint `state` as of `step` if the policy says it is due (or `force`).

        Every rank calls it with the same step, after `optimizer.step()`. Returns at once: it
        takes references to the tensors and hands them to the background copy; no store round,
        no collective. The tiers pull the snapshot in the background. Never raises for a tier
        failure (see the handle's `durable` future, `wait()` and the event log).

        With `sigterm_grace_s`, after a SIGTERM: the step the ranks agreed on is saved, made
        durable, and the process exits (it never returns then); each call reads one store key.
        """
        self._check_open()
        if self._sigterm is not None:
            save = lambda f: self._saves.save(step, state, force=f, lazy=self.lazy)
            return self._sigterm.save(step, save, force=force, close=self.close, emit=self.events.emit)
        return self._saves.save(step, state, force=force, lazy=self.lazy)

    def wait(self) -> None:
        """Block until every checkpoint taken so far is durable on its tiers.

        Raises NotDurableError naming each tier that failed when the newest checkpoint did not
        reach every tier, else the first earlier checkpoint that no tier could commit.
        """
        self._check_open()
        self._saves.wait()

    def latest(self) -> int | None:
        """The newest step committed on the persistent tier (or the local one), or None."""
        return self._saves.latest()

    def host_buffer_bytes(self) -> int:
        """Host memory held by snapshot buffers (bounded by `Tiers.host_buffers`)."""
        return self._saves.writer.host_bytes()

    def restore(self, state: Mapping[str, Any], *, step: int | None = None, strict: bool = True) -> int:
        """Load the freshest loadable checkpoint (or `step`) into `state`; return its step, 0 if none.

        Looks at every tier (memory, local with peer copies, persistent), freshest first and the
        fastest tier first; falls back to the next candidate when a file is missing or a checksum
        fails, logging which and why. Reshards when the saved layout differs from the running one.

        Strict: a checkpoint that does not fit `state` raises MismatchError at once, naming the
        tensors (no fallback: an older checkpoint would not fit either): a global shape or dtype
        kind that differs, checkpoint tensors of the restored names that no rank loads, or
        tensors of `state` the checkpoint lacks. `strict=False` loads what matches, keeps the
        rest as it is, and reports the skipped tensors (the log, the event log, `last_restore`).
        """
        self._check_open()
        self._saves.schedule.settle()
        self.fence()
        # Checkpoints still flowing down the tiers finish first: the inventory must not race
        # with commits, and peer copies must not share the peer group with peer fetches.
        self._saves.writer.drain()  # failures are reported by wait() and the event log
        sources = Sources(
            coord=self._session.coord, peer_group=self._session.peer_group, tiers=self._saves.writer.tiers(),
            rule=self._saves.capture.rule, rng=self.rng, root=self.root, events=self.events,
        )
        self.last_restore = restore_state(sources, state, step=step, strict=strict)
        return self.last_restore.step if self.last_restore is not None else 0

    def close(self) -> None:
        """Make the newest checkpoint durable on every tier, stop the background threads, remove
        the fence hooks, and let the root go.

        Raises NotDurableError naming the tier and the cause when the newest checkpoint could
        not be written to a tier (unless `wait()` already said so).
        """
        if self._closed:
            return
        atexit.unregister(self._close_at_exit)
        if self._sigterm is not None:
            self._sigterm.uninstall()
        failure = None
        try:
            failure = self._saves.close()
            if not self.events.flush():
                log.warning("elastickit: some records of the event log %s could not be written", self.events.path)
        finally:
            self._saves.capture.remove_fences()
            self._closed = True
            if self._session.claim is not None:
                self._session.claim.release()  # after the last write: the next writer may start
        if failure is not None:
            raise failure

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except ElastickitError as e:  # nobody to raise to at exit: say it instead
            log.error("elastickit: %s", e)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except ElastickitError as e:  # the error in flight says more; do not replace it
            log.error("elastickit: %s", e)
