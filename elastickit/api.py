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
import dataclasses
import logging
import operator
import os
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

import elastickit
from elastickit.checkpoint.coord import (
    Coordinator,
    LocalCoordinator,
    StoreCoordinator,
    gather_or_raise,
)
from elastickit.checkpoint.errors import ElastickitError, NotDurableError, RequestError
from elastickit.checkpoint.events import EventLog
from elastickit.checkpoint.format.manifest import LayoutRecord
from elastickit.checkpoint.paths import is_url, local_path, location
from elastickit.checkpoint.pipeline import AsyncWriter, WriterContext
from elastickit.checkpoint.plan.pieces import PieceRule, save_items
from elastickit.checkpoint.policy import IntervalPolicy
from elastickit.checkpoint.runs import RootClaim, claim_root, join_run
from elastickit.checkpoint.snapshot import snapshot_bytes
from elastickit.checkpoint.threads import lower_priority
from elastickit.checkpoint.tiers import Tiers, TierSpec
from elastickit.restoring import RestoreReport, Sources, restore_state
from elastickit.rng import rng_capture, rng_encode
from elastickit.state import StateDictCache, flatten_state

log = logging.getLogger("elastickit")

__all__ = ["Checkpointer", "IntervalPolicy", "SaveHandle", "TierSpec", "Tiers"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveHandle:
    """What `save` returns: one handle, whether or not a checkpoint is taken at this step.

    Attributes:
        step: the step asked for.
        scheduled: whether a checkpoint is taken (False: not due, or skipped; see `reason`).
        staged: done when the snapshot is copied (the tensors may change from then on).
        durable: done when every file tier committed it or a newer checkpoint (a tier that is
            busy skips to the newest); its result is the most durable path it reached
            (persistent, else local, else "memory"), or it raises the error.
        reason: why no checkpoint was taken, when `scheduled` is False.
    """

    step: int
    scheduled: bool
    staged: Future[None]
    durable: Future[str]
    reason: str = ""

    @classmethod
    def not_taken(cls, step: int, reason: str) -> SaveHandle:
        return cls(step=step, scheduled=False, staged=_done(), durable=_done(""), reason=reason)


def _done(value: Any = None) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _layout_record(layout: Any, world_size: int) -> LayoutRecord:
    if layout is None:
        return LayoutRecord(axes=(("world", world_size),))
    if isinstance(layout, LayoutRecord):
        return layout
    if hasattr(layout, "to_record"):  # elastickit.reshard ParallelLayout
        return layout.to_record()
    if hasattr(layout, "mesh_dim_names") and hasattr(layout, "shape"):  # a DeviceMesh
        names = layout.mesh_dim_names or tuple(f"dim{i}" for i in range(layout.ndim))
        return LayoutRecord(axes=tuple(zip(names, (int(n) for n in layout.shape), strict=True)))
    if isinstance(layout, Mapping):
        return LayoutRecord(axes=tuple((str(k), int(v)) for k, v in layout.items()))
    raise RequestError(
        f"layout must be a ParallelLayout, a DeviceMesh or a dict of axis sizes, got {type(layout).__name__}"
    )


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
    ) -> None:
        self.root = location(root, what="the Checkpointer root")
        if events:
            events = local_path(events, what="the events path")
        elif not is_url(self.root):
            events = os.path.join(self.root, "events.jsonl")
        else:  # an object store has no append: the log is local, where `events` says
            log.info("elastickit: no event log for %s (give events='a local path' to keep one)", self.root)
        try:
            self.policy = IntervalPolicy(
                every=every, every_seconds=every_seconds, auto=auto, mtbf_s=mtbf_s, events_path=events
            )
            tiers = tiers or Tiers()
            if keep_last is not None:
                if tiers.persistent is None:
                    raise ValueError("keep_last applies to the persistent tier, which these tiers leave out")
                p = tiers.persistent
                tiers = Tiers(
                    memory=tiers.memory,
                    local=tiers.local,
                    peer=tiers.peer,
                    persistent=dataclasses.replace(p, keep_last=keep_last),
                    ranks_per_node=tiers.ranks_per_node,
                    host_buffers=tiers.host_buffers,
                )
        except ValueError as e:
            raise RequestError(f"Checkpointer: {e}") from e
        if lazy not in ("auto", "always", "never"):
            raise RequestError(f"lazy must be 'auto', 'always' or 'never', got {lazy!r}")
        self.tiers = tiers
        self.lazy = lazy
        self.rng = rng
        self.rank, self.world_size = _dist()
        self._layout = _layout_record(layout, self.world_size)
        self._rules = rules
        # Rank 0 claims the root (a writable root, not a checkpoint; its writer lock; the run's
        # key); every rank then checks what it writes, and all raise together if any failed.
        persistent = (tiers.persistent.path or self.root) if tiers.persistent is not None else None
        self._claim: RootClaim | None = None
        first: dict[str, str] = {}
        if self.rank == 0:
            try:
                self._claim = claim_root(
                    self.root,
                    persistent=persistent,
                    events_dir=os.path.dirname(os.path.abspath(events)) if events else None,
                    storage_options=tiers.persistent.storage_options if tiers.persistent is not None else None,
                )
                first = {"key": self._claim.key, "anchor": self._claim.anchor}
            except RequestError as e:
                first = {"error": str(e)}
        self._nonce, self._peer_group, first = self._agree(first)
        self._coord = self._coordinator("main", timeout_s)
        try:
            local_base = tiers.local_path(self.rank, self.world_size) if tiers.local is not None else None
            local_root = join_run(self._coord, first, persistent=persistent, local_base=local_base)
        except BaseException:
            if self._claim is not None:
                self._claim.release()
            raise
        self.events = EventLog(events if self.rank == 0 else None)
        self._writer = AsyncWriter(
            WriterContext(
                rank=self.rank,
                world_size=self.world_size,
                tiers=tiers,
                persistent_root=self.root,
                local_root=local_root,
                layout=self._layout,
                rules=tuple(rules.to_json()) if rules is not None else (),
                framework={"torch": torch.__version__, "elastickit": elastickit.__version__},
                fsync=fsync,
                peer_group=self._peer_group,
                timeout_s=timeout_s,
            ),
            lambda name: self._coordinator(name, timeout_s),
            self.events,
        )
        self._next_due: int | None = None
        self._last_save_call: tuple[int, float] | None = None
        self._step_time_s = 0.0
        self._cost_s = 0.0
        self._last_snap: Any = None
        self._prev_items: list[Any] = []  # the last save's items, and their snapshot bytes
        self._prev_bytes = 0
        self._eager_memo: tuple[list[Any], tuple[Any, ...], frozenset[str]] | None = None
        # Time-based policies agree on the next due step in a store round, off the training thread.
        self._round: Future[None] | None = None
        self._rounds: queue.SimpleQueue[tuple[int | None, Future[None]] | None] = queue.SimpleQueue()
        self._round_thread: threading.Thread | None = None
        if self.world_size > 1 and not self.policy.step_based:
            self._round_thread = threading.Thread(target=self._round_loop, name="elastickit-round", daemon=True)
            self._round_thread.start()
        self._sd_cache = StateDictCache()
        self._item_memo: dict[str, Any] = {}
        self._hooked: dict[int, Any] = {}
        self._closed = False
        self._reported: int | None = None  # the step whose failure wait() or close() raised
        self.last_restore: RestoreReport | None = None  # what the last restore loaded and skipped
        # A script that ends without close() must not lose its last checkpoint: the background
        # threads are daemons, so wait for them at interpreter exit (close() unregisters this).
        atexit.register(self._close_at_exit)

    # -- plumbing -------------------------------------------------------------------------

    def _agree(self, first: dict[str, str]) -> tuple[str, Any, dict[str, str]]:
        """A fresh store key prefix, the peer group, and rank 0's claim of the root, on every rank."""
        if self.world_size == 1:
            return "local", None, first
        import torch.distributed as dist

        # Every rank builds its Checkpointer at the same point, so one broadcast agrees on a
        # fresh key prefix: a restarted job never reads a previous incarnation's keys.
        got = [(os.urandom(8).hex(), first) if self.rank == 0 else None]
        dist.broadcast_object_list(got, src=0)
        # Peer copies and peer fetches travel on their own gloo group, never the training one.
        group = dist.new_group(backend="gloo") if self.tiers.local is not None else None
        nonce, first = got[0]
        return str(nonce), group, dict(first)

    def _coordinator(self, name: str, timeout_s: float) -> Coordinator:
        if self.world_size == 1:
            return LocalCoordinator()
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        return StoreCoordinator(
            store,
            rank=self.rank,
            world_size=self.world_size,
            prefix=f"elastickit/{self._nonce}/{name}",
            timeout_s=timeout_s,
        )

    def _piece_rule(self) -> PieceRule | None:
        if self._rules is None:
            return None
        return self._rules.piece_rule(self._layout, self.rank)

    def _check_open(self) -> None:
        if self._closed:
            raise RequestError("this Checkpointer is closed; create a new one")

    def _install_fence(self, state: Mapping[str, Any]) -> None:
        for obj in state.values():
            if isinstance(obj, torch.optim.Optimizer) and id(obj) not in self._hooked:
                self._hooked[id(obj)] = obj.register_step_pre_hook(self._fence_hook(obj))

    def _fence_hook(self, optimizer: torch.optim.Optimizer) -> Any:
        """The step pre-hook that waits for the copy before `optimizer` changes a tensor.

        A step given a closure (Lightning passes its whole training step as one, forward and
        backward included) would wait before the closure runs, leaving the copy nothing to overlap.
        torch's own optimizers evaluate the closure before they change anything, so for them the
        wait moves into the closure, after it returns. Any other optimizer (a subclass included:
        its step may do otherwise) waits before its step starts.
        """
        closure_first = type(optimizer).__module__.startswith("torch.optim.")

        def hook(_opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            positional = len(args) > 1  # args[0] is the optimizer
            closure = args[1] if positional else kwargs.get("closure")
            if closure is None or not closure_first:
                self.fence()
                return None

            def fenced() -> Any:
                loss = closure()
                self.fence()
                return loss

            if positional:
                return (args[0], fenced, *args[2:]), kwargs
            return args, {**kwargs, "closure": fenced}

        return hook

    def _eager_keys(self, items: list[Any], flat: Any, state: Mapping[str, Any]) -> frozenset[str]:
        """Keys of `items` copied before `save` returns: what no optimizer step fences."""
        optims = tuple(
            (o, tuple(p for g in o.param_groups for p in g["params"]))
            for o in state.values()
            if isinstance(o, torch.optim.Optimizer)
        )
        memo = self._eager_memo
        if memo is not None and memo[0] is items and len(memo[1]) == len(optims) and all(
            a[0] is b[0] and len(a[1]) == len(b[1]) and all(map(operator.is_, a[1], b[1]))
            for a, b in zip(memo[1], optims, strict=True)
        ):
            return memo[2]
        eager = frozenset(it.key for it in items) - self._fenced_keys(flat, state)
        self._eager_memo = (items, optims, eager)
        return eager

    @staticmethod
    def _fenced_keys(flat: Any, state: Mapping[str, Any]) -> frozenset[str]:
        """Logical names of tensors that only an optimizer step changes (copied lazily)."""
        ptrs = set()
        for obj in state.values():
            if isinstance(obj, torch.optim.Optimizer):
                for group in obj.param_groups:
                    for p in group["params"]:
                        local = p.to_local() if hasattr(p, "to_local") else p
                        ptrs.add(local.data_ptr())
                        for t in obj.state.get(p, {}).values():
                            if isinstance(t, torch.Tensor):
                                t = t.to_local() if hasattr(t, "to_local") else t
                                ptrs.add(t.data_ptr())
        out = set()
        for name, t in flat.tensors.items():
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.numel() and local.data_ptr() in ptrs:
                out.add(name)
        return frozenset(out)

    # -- public API ---------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the policy takes a checkpoint at `step` (the same answer on every rank)."""
        if self.policy.step_based:
            return step % self.policy.every_n == 0
        return self._next_due is None or step >= self._next_due

    def fence(self) -> None:
        """Block until the newest snapshot is copied (called before each optimizer step)."""
        snap = self._last_snap
        if snap is not None and not snap.staged.done():
            snap.staged.result()

    def save(self, step: int, state: Mapping[str, Any], *, force: bool = False) -> SaveHandle:
        """Checkpoint `state` as of `step` if the policy says it is due (or `force`).

        Every rank calls it with the same step, after `optimizer.step()`. Returns at once: it
        takes references to the tensors and hands them to the background copy; no store round,
        no collective. The tiers pull the snapshot in the background. Never raises for a tier
        failure (see the handle's `durable` future, `wait()` and the event log).
        """
        self._check_open()
        self._await_round()  # a time-based policy: the previous round set the next due step
        now = time.monotonic()
        if self._last_save_call is not None and step > self._last_save_call[0]:
            dt = (now - self._last_save_call[1]) / (step - self._last_save_call[0])
            self._step_time_s = dt if not self._step_time_s else 0.8 * self._step_time_s + 0.2 * dt
        self._last_save_call = (step, now)
        if not (force or self.due(step)):
            return SaveHandle.not_taken(step, "not due")
        t0 = time.perf_counter()
        self.fence()  # one snapshot in flight at a time keeps the copy order simple
        flat, _ = flatten_state(state, self._sd_cache)
        items = save_items(flat.tensors, self._piece_rule(), self._item_memo)
        prev = self._prev_items
        if len(items) == len(prev) and all(map(operator.is_, items, prev)):
            items = prev  # the same list object: what is derived from it is reused
        else:
            self._prev_items, self._prev_bytes = items, snapshot_bytes(items)
        if self.lazy == "never":
            eager = frozenset(it.key for it in items)
        elif self.lazy == "always":
            eager = frozenset()
        else:
            eager = self._eager_keys(items, flat, state)
        self._install_fence(state)
        rank_object: Any = {}
        if self.rng:
            raw = rng_capture()  # encoded only if a file tier takes this snapshot
            rank_object = lambda: {"rng": rng_encode(raw)}
        snap, durable, reason = self._writer.submit(
            step, items, flat.objects, rank_object, self._prev_bytes, time.perf_counter() - t0, eager
        )
        if not self.policy.step_based:
            self._start_round(step)
        self._cost_s = time.perf_counter() - t0 if not self._cost_s else 0.8 * self._cost_s + 0.2 * (time.perf_counter() - t0)
        if snap is None:
            return SaveHandle.not_taken(step, reason)
        self._last_snap = snap
        if self.lazy == "never":
            snap.staged.result()
        return SaveHandle(step=step, scheduled=True, staged=snap.staged, durable=durable)

    def _start_round(self, step: int) -> None:
        """Agree on the next due step (rank 0 chooses it from the measured costs), off the
        training thread; the next `save` waits for it, which by then has long finished."""
        next_due = None
        if self.rank == 0:
            next_due = self.policy.next_due_step(step, step_time_s=self._step_time_s, cost_s=self._cost_s)
        done: Future[None] = Future()
        self._round = done
        if self._round_thread is None:
            self._run_round(next_due, done)
        else:
            self._rounds.put((next_due, done))

    def _await_round(self) -> None:
        """Wait for the round in flight; raise its failure once."""
        done = self._round
        if done is None:
            return
        try:
            done.result()
        except BaseException:
            self._round = None
            raise

    def _round_loop(self) -> None:
        lower_priority()
        while True:
            job = self._rounds.get()
            if job is None:
                return
            self._run_round(*job)

    def _run_round(self, next_due: int | None, done: Future[None]) -> None:
        try:
            got = gather_or_raise(self._coord, None, next_due, phase="checkpoint schedule")
        except BaseException as e:  # raised on the training thread by the next save
            done.set_exception(e)
            return
        self._next_due = got[0]
        done.set_result(None)

    def wait(self) -> None:
        """Block until every checkpoint taken so far is durable on its tiers.

        Raises NotDurableError naming each tier that failed when the newest checkpoint did not
        reach every tier, else the first earlier checkpoint that no tier could commit.
        """
        self._check_open()
        self._await_round()
        errors = self._writer.drain()
        failures = self._writer.take_failures()
        first = self._not_durable() or (errors[0] if errors else (failures[0] if failures else None))
        if first is not None:
            raise first

    def _not_durable(self) -> NotDurableError | None:
        """Why the newest checkpoint is not on every tier, once (wait() and close() both ask)."""
        error = self._writer.not_durable()
        if error is None or self._reported == error.step:
            return None
        self._reported = error.step
        return error

    def latest(self) -> int | None:
        """The newest step committed on the persistent tier (or the local one), or None."""
        steps = self._writer.committed()
        return max(steps) if steps else None

    def host_buffer_bytes(self) -> int:
        """Host memory held by snapshot buffers (bounded by `Tiers.host_buffers`)."""
        return self._writer.host_bytes()

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
        self._await_round()
        self.fence()
        # Checkpoints still flowing down the tiers finish first: the inventory must not race
        # with commits, and peer copies must not share the peer group with peer fetches.
        self._writer.drain()  # failures are reported by wait() and the event log
        sources = Sources(
            coord=self._coord,
            peer_group=self._peer_group,
            memory=self._writer.snapshots(),
            tiers=self._writer.tiers(),
            rule=self._piece_rule(),
            rng=self.rng,
            root=self.root,
            events=self.events,
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
        failure = None
        try:
            try:
                self._await_round()
            except BaseException as e:  # the round failed; closing must go on
                log.warning("elastickit: the last schedule round failed: %s", e)
            if self._round_thread is not None:
                self._rounds.put(None)
                self._round_thread.join(timeout=60)
            self._writer.close()
            failure = self._not_durable()
        finally:
            for h in self._hooked.values():
                h.remove()
            self._hooked.clear()
            self._closed = True
            if self._claim is not None:
                self._claim.release()  # after the last write: the next writer may start
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


