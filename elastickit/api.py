"""The public API: `Checkpointer` (DESIGN.md section 7a).

    ck = ek.Checkpointer("runs/exp1/ckpt", every=100)
    step = ck.restore({"model": model, "optim": optimizer, "data": loader})   # 0 if none
    for step in range(step, total):
        ...
        optimizer.step()
        ck.save(step + 1, {"model": model, "optim": optimizer, "data": loader})
    ck.close()

The same object works in one process and under torchrun (every rank constructs it with the same
arguments, in the same order). Restore reshards when the running layout differs from the saved one.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

import elastickit
from elastickit.checkpoint.catalog import list_checkpoints, load_manifest
from elastickit.checkpoint.coord import Coordinator, LocalCoordinator, StoreCoordinator, gather_or_raise
from elastickit.checkpoint.errors import DataError, RankFailure, RequestError
from elastickit.checkpoint.items import Piece
from elastickit.checkpoint.manifest import LayoutRecord, Manifest
from elastickit.checkpoint.state import (
    PieceRule,
    flatten_state,
    load_items,
    missing_tensors,
    new_tensor,
    save_items,
    apply_state,
)
from elastickit.checkpoint.writer import SaveRequest, write_checkpoint
from elastickit.reshard.executor import execute
from elastickit.reshard.planner import plan_reads

log = logging.getLogger("elastickit")


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveHandle:
    """What `save` returns: one handle, whether or not the policy made this step a checkpoint.

    Attributes:
        step: the step asked for.
        scheduled: whether a checkpoint is taken at this step (False: the policy skipped it).
        staged: done when the snapshot is taken (the tensors may change from then on).
        durable: done when the checkpoint is committed on every tier; its result is the
            checkpoint path, or it raises the save's error.
    """

    step: int
    scheduled: bool
    staged: Future[None]
    durable: Future[str]


def _done(value: Any = None) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f


def _failed(e: BaseException) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_exception(e)
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
    raise RequestError(f"layout must be a ParallelLayout, a DeviceMesh or a dict of axis sizes, got {type(layout).__name__}")


def _rng_state() -> dict[str, Any]:
    import base64

    out: dict[str, Any] = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": list(_to_lists(random.getstate())),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        out["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
    except ImportError:
        pass
    return out


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, list | tuple) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(d: Mapping[str, Any]) -> None:
    import base64

    import numpy as np

    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(d["torch"])), dtype=torch.uint8))
    random.setstate(_to_tuples(d["python"]))
    if "cuda" in d and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in d["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "numpy" in d:
        kind, keys, pos, has_gauss, gauss = d["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


@dataclass(slots=True)
class _Stats:
    saves: int = 0
    last_save_s: float = 0.0
    last_restore_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class Checkpointer:
    """Saves and restores a training state under `root` (DESIGN.md section 7a).

    Args:
        root: the checkpoint root directory (shared by all ranks).
        every: take a checkpoint every N steps (`save` is cheap on other steps). 1 by default.
        layout: the running parallel layout (a ParallelLayout, a DeviceMesh or a dict of axis
            sizes), recorded in the manifest. Default: one `world` axis.
        rules: resharding rules (an `elastickit.reshard` RuleSet) for tensors whose placement
            alone does not say how they relate to their logical tensors.
        rng: save and restore each rank's RNG states (torch, CUDA, python, numpy).
        fsync: make every checkpoint durable before it commits.
        keep_last: keep only the newest N committed checkpoints (None: keep all).
        timeout_s: how long a rank waits for the others in a save or restore.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        every: int = 1,
        layout: Any = None,
        rules: Any = None,
        rng: bool = True,
        fsync: bool = True,
        keep_last: int | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        if every < 1:
            raise RequestError(f"every must be >= 1, got {every}")
        if keep_last is not None and keep_last < 1:
            raise RequestError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root = os.fspath(root)
        self.every = every
        self.rng = rng
        self.fsync = fsync
        self.keep_last = keep_last
        self.rank, self.world_size = _dist()
        self._layout = _layout_record(layout, self.world_size)
        self._rules = rules
        self._coord = self._make_coordinator(timeout_s)
        self._closed = False
        self.stats = _Stats()

    # -- plumbing -------------------------------------------------------------------------

    def _make_coordinator(self, timeout_s: float) -> Coordinator:
        if self.world_size == 1:
            return LocalCoordinator()
        import torch.distributed as dist

        # Every rank builds its Checkpointer at the same point, so one broadcast agrees on a
        # fresh key prefix; a restarted job never reads a previous incarnation's keys.
        nonce = [os.urandom(8).hex() if self.rank == 0 else None]
        dist.broadcast_object_list(nonce, src=0)
        store = dist.distributed_c10d._get_default_store()
        return StoreCoordinator(
            store, rank=self.rank, world_size=self.world_size, prefix=f"elastickit/{nonce[0]}", timeout_s=timeout_s
        )

    def _piece_rule(self) -> PieceRule | None:
        if self._rules is None:
            return None
        return self._rules.piece_rule(self._layout, self.rank)

    def _rules_json(self) -> tuple[dict[str, Any], ...]:
        return tuple(self._rules.to_json()) if self._rules is not None else ()

    def _check_open(self) -> None:
        if self._closed:
            raise RequestError("this Checkpointer is closed; create a new one")

    # -- public API ---------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the policy takes a checkpoint at `step`."""
        return step % self.every == 0

    def save(self, step: int, state: Mapping[str, Any], *, force: bool = False) -> SaveHandle:
        """Checkpoint `state` as of `step` if the policy says it is due (or `force`).

        Every rank calls it with the same step. Returns a SaveHandle; a save that fails raises
        here in this synchronous writer.
        """
        self._check_open()
        if not (force or self.due(step)):
            return SaveHandle(step=step, scheduled=False, staged=_done(), durable=_done(""))
        t0 = time.perf_counter()
        flat, _ = flatten_state(state)
        req = SaveRequest(
            root=self.root,
            step=step,
            items=save_items(flat, self._piece_rule()),
            objects=flat.objects,
            rank_object={"rng": _rng_state()} if self.rng else {},
            layout=self._layout,
            rules=self._rules_json(),
            framework={"torch": torch.__version__, "elastickit": elastickit.__version__},
            fsync=self.fsync,
        )
        manifest = write_checkpoint(req, self._coord)
        path = os.path.join(self.root, f"step-{manifest.step:08d}")
        self.stats.saves += 1
        self.stats.last_save_s = time.perf_counter() - t0
        self._retain()
        return SaveHandle(step=step, scheduled=True, staged=_done(), durable=_done(path))

    def _retain(self) -> None:
        if self.keep_last is None or self.rank != 0:
            return
        import shutil

        done = [c for c in list_checkpoints(self.root) if c.complete]
        for c in done[: max(0, len(done) - self.keep_last)]:
            # Retire the manifest first: a crash midway leaves an incomplete dir, never a
            # manifest that names deleted files.
            os.remove(os.path.join(c.path, "manifest.json"))
            shutil.rmtree(c.path, ignore_errors=True)

    def wait(self) -> None:
        """Block until every scheduled checkpoint is durable (immediate for this writer)."""
        self._check_open()

    def latest(self) -> int | None:
        """The newest committed step under root, or None."""
        done = [c for c in list_checkpoints(self.root) if c.complete]
        return done[-1].step if done else None

    def restore(self, state: Mapping[str, Any], *, step: int | None = None) -> int:
        """Load the newest loadable checkpoint (or `step`) into `state`; return its step, 0 if none.

        Falls back to the next older checkpoint when a file is missing or a checksum fails,
        logging which one and why. Reshards when the saved layout differs from the running one.
        """
        self._check_open()
        t0 = time.perf_counter()
        local = [c.step for c in list_checkpoints(self.root) if c.complete]
        # Every rank must load the same step: take rank 0's view of the candidates.
        candidates = self._coord.all_gather(local, phase="restore list")[0]
        if step is not None:
            if step not in candidates:
                raise RequestError(f"{self.root} has no committed checkpoint of step {step} (it has {candidates})")
            candidates = [step]
        reasons = []
        for s in sorted(candidates, reverse=True):
            path = os.path.join(self.root, f"step-{s:08d}")
            error = None
            try:
                self._restore_one(path, state)
            except DataError as e:
                error = str(e)
            try:
                gather_or_raise(self._coord, error, None, phase=f"restore of {path}")
            except RankFailure as e:
                reasons.append(f"step {s}: {e}")
                log.warning("elastickit: cannot restore %s (%s); trying an older checkpoint", path, e)
                if step is not None:
                    raise DataError(str(e), path=path) from e
                continue
            self.stats.last_restore_s = time.perf_counter() - t0
            if reasons:
                log.warning("elastickit: restored step %d after skipping: %s", s, "; ".join(reasons))
            return s
        if reasons:
            raise DataError(f"no checkpoint under {self.root} could be restored: {'; '.join(reasons)}", path=self.root)
        return 0

    def _restore_one(self, path: str, state: Mapping[str, Any]) -> Manifest:
        manifest = load_manifest(path)
        unknown = sorted(set(state) - set(manifest.objects))
        if unknown:
            raise RequestError(
                f"the checkpoint {path} has no state {unknown[0]!r} (it has {sorted(manifest.objects)}); "
                "restore with the names that were saved"
            )
        flat, sds = flatten_state(state)
        items = load_items(flat, self._piece_rule())
        targets = {it.key: it.tensor for it in items}
        wants: list[tuple[str, tuple[Piece, ...]]] = [(it.key, it.pieces) for it in items]
        extra = {}
        for name in missing_tensors(manifest.objects, flat):
            entry = manifest.tensors.get(name)
            if entry is None:
                raise DataError(f"{path}: the manifest tags tensor {name!r} but does not describe it", path=path)
            extra[name] = new_tensor(entry.dtype, entry.shape)
            wants.append((name, (Piece.whole(name, (0,) * len(entry.shape), entry.shape),)))
        targets.update(extra)
        plan = plan_reads(manifest, wants)
        with torch.no_grad():
            execute(plan, path, manifest, targets)
        apply_state(state, sds, manifest.objects, {**flat.tensors, **extra})
        if self.rng and manifest.rank_objects and manifest.world_size == self.world_size:
            rng = manifest.rank_objects[self.rank].get("rng")
            if rng:
                _set_rng_state(rng)
        return manifest

    def close(self) -> None:
        """Wait for pending work and release resources. Idempotent."""
        if not self._closed:
            self.wait()
            self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
