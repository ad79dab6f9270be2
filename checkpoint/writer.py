"""Writing one checkpoint from every rank, and committing it.

The driver, in three store-coordinated phases (every rank calls `write_checkpoint` with its own
items):

1. plan: every rank publishes what it holds (physical keys, the logical boxes they carry, the
   logical specs); every rank then computes the same deduplication: each logical box is written
   once, by the lowest rank that holds it (all holders when a rule asks for merge=average/check).
2. write: every rank writes `rank-<r>.safetensors` with the keys it owns, fsyncs it and the
   directory, and publishes the file's record (or its error).
3. commit: rank 0 builds the manifest, writes it last by atomic rename, and publishes the result;
   every rank returns the manifest or raises the same `RankFailure`.

A crash at any instant leaves the previous checkpoints untouched and this one without a manifest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .coord import Coordinator, gather_or_raise
from .errors import ElastickitError
from .integrity import atomic_write_text, fsync_dir
from .items import LogicalSpec, Piece, SaveItem
from .manifest import (
    MANIFEST_NAME,
    FileRecord,
    LayoutRecord,
    Manifest,
    ShardRef,
    TensorEntry,
    rank_file_name,
    step_dir_name,
)
from .stfile import write_file

if TYPE_CHECKING:
    from .objstore import ObjectRoot


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveRequest:
    """One rank's part of a checkpoint.

    Attributes:
        root: the checkpoint root; the checkpoint goes to `<root>/step-<8 digits>/`.
        step: the training step.
        items: the physical tensors this rank holds (host or device memory).
        objects: non-tensor state shared by all ranks (rank 0's copy is kept), JSON-able.
        rank_object: this rank's own non-tensor state (its RNG), JSON-able.
        layout: the layout that saves.
        rules: the resharding rules in force, as JSON.
        framework: what writes it (versions), recorded in the manifest.
        fsync: make files durable before the commit (off only for tests of the page cache).
        zstd_level: compress the rank file with zstd at this level (None: no compression).
        zstd_threads: zstd worker threads (0: compress on the calling thread).
        before_item: called with a key before its tensor is read (to overlap with a copy).
    """

    root: str
    step: int
    items: Sequence[SaveItem]
    objects: dict[str, Any] = field(default_factory=dict)
    rank_object: dict[str, Any] = field(default_factory=dict)
    layout: LayoutRecord = field(default_factory=LayoutRecord)
    rules: tuple[dict[str, Any], ...] = ()
    framework: dict[str, str] = field(default_factory=dict)
    fsync: bool = True
    zstd_level: int | None = None
    zstd_threads: int = 0
    before_item: Callable[[str], None] | None = None


def _describe(items: Sequence[SaveItem]) -> list[dict[str, Any]]:
    return [
        {
            "key": it.key,
            "pieces": [[p.logical, list(p.offsets), list(p.lengths), list(p.stored_offsets)] for p in it.pieces],
            "specs": [[s.name, s.dtype, list(s.shape), s.merge] for s in it.specs],
        }
        for it in items
    ]


@dataclass(frozen=True, slots=True)
class _Plan:
    specs: dict[str, LogicalSpec]
    # rank -> key -> list of (Piece, replica) that rank writes
    owned: list[dict[str, list[tuple[Piece, int]]]]


def plan_dedup(described: list[list[dict[str, Any]]]) -> _Plan:
    """Decide who writes what, identically on every rank (a pure function of the gathered plans).

    Raises ValueError naming the tensor when ranks disagree on a logical tensor's dtype or shape.
    """
    specs: dict[str, LogicalSpec] = {}
    seen: dict[tuple[str, tuple[int, ...], tuple[int, ...]], int] = {}
    owned: list[dict[str, list[tuple[Piece, int]]]] = []
    for rank, items in enumerate(described):
        mine: dict[str, list[tuple[Piece, int]]] = {}
        for it in items:
            for name, dtype, shape, merge in it["specs"]:
                spec = LogicalSpec(name=name, dtype=dtype, shape=tuple(shape), merge=merge)
                prev = specs.setdefault(name, spec)
                if prev != spec:
                    raise ValueError(
                        f"tensor {name!r} is {prev.dtype}{list(prev.shape)} on one rank but "
                        f"{dtype}{list(shape)} on rank {rank}; every rank must agree on a logical tensor"
                    )
            for logical, offsets, lengths, stored in it["pieces"]:
                region = (logical, tuple(offsets), tuple(lengths))
                count = seen.get(region, 0)
                seen[region] = count + 1
                if count and specs[logical].merge == "first":
                    continue  # an identical replica is already written by a lower rank
                piece = Piece(
                    logical=logical, offsets=tuple(offsets), lengths=tuple(lengths), stored_offsets=tuple(stored)
                )
                mine.setdefault(it["key"], []).append((piece, count))
        owned.append(mine)
    return _Plan(specs=specs, owned=owned)


def _host(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "to_local"):  # a DTensor: its local shard is what this rank stores
        t = t.to_local()
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


@dataclass(frozen=True)
class SavePlan:
    """What every rank holds, gathered once per checkpoint, and who writes what."""

    described: list[list[dict[str, Any]]]

    def dedup(self) -> _Plan:
        """The deduplication of `described`, computed once (every tier uses it)."""
        got = self.__dict__.get("_dedup")
        if got is None:
            got = plan_dedup(self.described)
            object.__setattr__(self, "_dedup", got)
        return got


def _same_items(a: Sequence[SaveItem], b: Sequence[SaveItem]) -> bool:
    return len(a) == len(b) and all(
        x.key == y.key and x.pieces is y.pieces and x.specs is y.specs for x, y in zip(a, b, strict=True)
    )


class PlanCache:
    """The plan of the last commit of a sequence (one per tier): a rank describes its items
    only when they changed since, and the deduplication is computed again only then."""

    def __init__(self) -> None:
        self._items: Sequence[SaveItem] | None = None
        self._described: list[list[dict[str, Any]]] = []
        self._plan: SavePlan | None = None

    def describe(self, items: Sequence[SaveItem]) -> list[dict[str, Any]] | None:
        """This rank's description for the plan round, or None when unchanged."""
        if self._items is not None and _same_items(self._items, items):
            return None
        return _describe(items)

    def update(self, items: Sequence[SaveItem], gathered: list[list[dict[str, Any]] | None]) -> SavePlan:
        """The plan, from every rank's description (None: the rank's previous one)."""
        if self._plan is None or any(d is not None for d in gathered):
            self._described = [d if d is not None else self._described[r] for r, d in enumerate(gathered)]
            self._plan = SavePlan(described=self._described)
        self._items = items
        return self._plan


def write_checkpoint(
    req: SaveRequest,
    coord: Coordinator,
    *,
    plans: PlanCache | None = None,
    share: bool = True,
    store: ObjectRoot | None = None,
) -> Manifest | None:
    """Write this rank's part of checkpoint `req.step` and commit it with the others.

    Every rank of `coord` calls it with its own request; all return the committed Manifest or all
    raise `RankFailure` naming each failing rank's cause. `plans` remembers the plan between
    commits of one tier (ranks then send their descriptions only when they changed). With
    `share=False` only rank 0 gets the Manifest (the others None): it does not travel through the
    store. With `store` (an object-storage root, `req.root` its URL) the same three phases
    upload the rank files and put the manifest last, after every object is confirmed.
    """
    if store is not None:
        return _write_objects(req, coord, plans, share, store)
    step_dir = os.path.join(req.root, step_dir_name(req.step))
    rank = coord.rank

    # Phase 1: plan. Rank 0 first retires an existing manifest of this step, so that a re-save
    # never leaves a manifest pointing at files being rewritten.
    error = None
    try:
        os.makedirs(step_dir, exist_ok=True)
        if rank == 0:
            man = os.path.join(step_dir, MANIFEST_NAME)
            if os.path.exists(man):
                os.replace(man, man + ".replaced")
                fsync_dir(step_dir)
    except OSError as e:
        error = f"cannot prepare {step_dir} ({e.strerror}); check the path and its permissions"
    desc = plans.describe(req.items) if plans is not None else _describe(req.items)
    payload = {"items": desc, "rank_object": req.rank_object}
    gathered = gather_or_raise(coord, error, payload, phase="checkpoint plan")
    if plans is not None:
        plan = plans.update(req.items, [g["items"] for g in gathered])
    else:
        plan = SavePlan(described=[g["items"] for g in gathered])
    rank_objects = tuple(g["rank_object"] for g in gathered)

    # Phase 2: write what this rank owns.
    error, record = None, None
    try:
        mine = plan.dedup().owned[rank]
        by_key = {it.key: it for it in req.items}
        tensors = [(key, _host(by_key[key].tensor)) for key in mine]
        path = os.path.join(step_dir, rank_file_name(rank, compressed=req.zstd_level is not None))
        if tensors:
            record = write_file(
                path,
                tensors,
                rank=rank,
                fsync=req.fsync,
                zstd_level=req.zstd_level,
                zstd_threads=req.zstd_threads,
                before_item=req.before_item,
            ).to_json()
            if req.fsync:
                fsync_dir(step_dir)
    except (OSError, ValueError, ElastickitError) as e:
        error = f"{type(e).__name__}: {e}"
    records = gather_or_raise(coord, error, record, phase="checkpoint write")

    # Phase 3: commit on rank 0.
    error, manifest, manifest_json = None, None, None
    if rank == 0:
        try:
            manifest = _build_manifest(req, plan.dedup(), rank_objects, records, coord.world_size)
            atomic_write_text(os.path.join(step_dir, MANIFEST_NAME), manifest.dumps(), fsync=req.fsync)
            if req.fsync:
                fsync_dir(req.root)
            if share and coord.world_size > 1:
                manifest_json = manifest.to_json()
        except (OSError, ValueError) as e:
            error = f"cannot commit {step_dir}: {e}"
    committed = gather_or_raise(coord, error, manifest_json, phase="checkpoint commit")
    if manifest is not None or not share:
        return manifest
    return Manifest.from_json(committed[0], source=os.path.join(step_dir, MANIFEST_NAME))


def _write_objects(
    req: SaveRequest, coord: Coordinator, plans: PlanCache | None, share: bool, store: ObjectRoot
) -> Manifest | None:
    """`write_checkpoint` on object storage: no directories, no rename, the same commit rule."""
    rank, where = coord.rank, store.step_url(req.step)
    error = None
    if rank == 0:  # a re-save: the old manifest goes first, so it never names replaced objects
        try:
            store.retire(req.step)
        except Exception as e:  # noqa: BLE001 - every rank raises it below
            error = f"cannot prepare {where} ({type(e).__name__}: {e})"
    desc = plans.describe(req.items) if plans is not None else _describe(req.items)
    gathered = gather_or_raise(coord, error, {"items": desc, "rank_object": req.rank_object}, phase="checkpoint plan")
    if plans is not None:
        plan = plans.update(req.items, [g["items"] for g in gathered])
    else:
        plan = SavePlan(described=[g["items"] for g in gathered])
    rank_objects = tuple(g["rank_object"] for g in gathered)

    error, record = None, None
    try:
        mine = plan.dedup().owned[rank]
        by_key = {it.key: it for it in req.items}
        tensors = [(key, _host(by_key[key].tensor)) for key in mine]
        if tensors:
            name = rank_file_name(rank, compressed=req.zstd_level is not None)
            record = store.write_rank_file(
                req.step,
                name,
                tensors,
                rank=rank,
                zstd_level=req.zstd_level,
                zstd_threads=req.zstd_threads,
                before_item=req.before_item,
            ).to_json()
    except Exception as e:  # noqa: BLE001 - the store's errors are many; every rank raises them
        error = f"cannot upload to {where} ({type(e).__name__}: {e})"
    records = gather_or_raise(coord, error, record, phase="checkpoint write")

    error, manifest, manifest_json = None, None, None
    if rank == 0:
        try:
            manifest = _build_manifest(req, plan.dedup(), rank_objects, records, coord.world_size)
            store.commit(req.step, manifest)
            if share and coord.world_size > 1:
                manifest_json = manifest.to_json()
        except Exception as e:  # noqa: BLE001
            error = f"cannot commit {where} ({type(e).__name__}: {e})"
    committed = gather_or_raise(coord, error, manifest_json, phase="checkpoint commit")
    if manifest is not None or not share:
        return manifest
    return Manifest.from_json(committed[0], source=f"{where}/{MANIFEST_NAME}")


def _build_manifest(
    req: SaveRequest,
    plan: _Plan,
    rank_objects: tuple[dict[str, Any], ...],
    records: list[Any],
    world_size: int,
) -> Manifest:
    files: dict[str, FileRecord] = {}
    for rank, rec in enumerate(records):
        if rec is not None:
            name = rank_file_name(rank, compressed=rec.get("compression", "none") == "zstd")
            files[name] = FileRecord.from_json(name, rec)
    shards: dict[str, list[ShardRef]] = {name: [] for name in plan.specs}
    for rank, mine in enumerate(plan.owned):
        if not mine:
            continue
        fname = rank_file_name(rank, compressed=records[rank].get("compression", "none") == "zstd")
        for key, pieces in mine.items():
            for piece, replica in pieces:
                shards[piece.logical].append(
                    ShardRef(
                        file=fname,
                        key=key,
                        offsets=piece.offsets,
                        lengths=piece.lengths,
                        stored_offsets=piece.stored_offsets,
                        replica=replica,
                    )
                )
    tensors = {
        name: TensorEntry(
            name=name,
            dtype=spec.dtype,
            shape=spec.shape,
            shards=tuple(sorted(shards[name], key=lambda s: (s.replica, s.offsets, s.file))),
            merge=spec.merge,
        )
        for name, spec in plan.specs.items()
    }
    return Manifest(
        step=req.step,
        created_s=time.time(),
        world_size=world_size,
        layout=req.layout,
        rules=req.rules,
        tensors=tensors,
        files=files,
        objects=req.objects,
        rank_objects=rank_objects,
        framework=req.framework,
    )
