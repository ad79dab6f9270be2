"""Writing one checkpoint from every rank, and committing it.

The driver, in three store-coordinated phases (every rank calls `write_checkpoint` with its own
items):

1. plan: every rank publishes what it holds (physical keys, the logical boxes they carry, the
   logical specs); every rank then computes the same deduplication: each logical box is written
   once, by the lowest rank that holds it (all holders when a rule asks for merge=average/check).
2. write: every rank writes `rank-<r>.safetensors` with the keys it owns, fsyncs it and the
   directory, and publishes the file's record (or its error).
3. commit: rank 0 builds the manifest, commits it last (an atomic rename in a directory, a PUT
   after every object is confirmed in an object store), and publishes the result; every rank
   returns the manifest or raises the same `RankFailure`.

Where the files go is the tier's business (`storage.tier.Tier`): this driver never builds a path.

A crash at any instant leaves the previous checkpoints untouched and this one without a manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..coord import Coordinator, gather_or_raise
from ..format.items import SaveItem
from ..format.manifest import MANIFEST_NAME, FileRecord, LayoutRecord, Manifest, rank_file_name
from ..plan.save import PlanCache, SavePlan, build_manifest, describe_items
from ..storage.files import DirTier, RootGoneError

if TYPE_CHECKING:
    from ..storage.tier import Tier


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


def _host(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "to_local"):  # a DTensor: its local shard is what this rank stores
        t = t.to_local()
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def write_checkpoint(
    req: SaveRequest,
    coord: Coordinator,
    *,
    plans: PlanCache | None = None,
    share: bool = True,
    tier: Tier | None = None,
) -> Manifest | None:
    """Write this rank's part of checkpoint `req.step` to `tier` and commit it with the others.

    Every rank of `coord` calls it with its own request; all return the committed Manifest or all
    raise `RankFailure` naming each failing rank's cause. `tier`: where the step goes (any
    `storage.tier.Tier`: a directory, a node-local directory, an object store); None means the
    directory root `req.root`. `plans` remembers the plan between commits of one tier (ranks then
    send their descriptions only when they changed). With `share=False` only rank 0 gets the
    Manifest (the others None): it does not travel through the store.
    """
    tier = tier if tier is not None else DirTier("persistent", req.root)
    where = tier.step_where(req.step)
    rank = coord.rank

    # Phase 1: plan. Rank 0 first retires an existing manifest of this step, so that a re-save
    # never leaves a manifest pointing at files being rewritten.
    error = None
    try:
        tier.prepare(req.step, leader=rank == 0)
    except RootGoneError as e:
        error = str(e)  # a whole sentence: the root vanished, nothing is written in its place
    except Exception as e:  # noqa: BLE001 - every rank raises it below, with each rank's cause
        why = f"{e.strerror}); check the path and its permissions" if isinstance(e, OSError) and e.strerror else f"{_why(e)})"
        error = f"cannot prepare {where} ({why}"
    desc = plans.describe(req.items) if plans is not None else describe_items(req.items)
    payload = {"items": desc, "rank_object": req.rank_object}
    gathered = gather_or_raise(coord, error, payload, phase="checkpoint plan")
    if plans is not None:
        plan = plans.update(req.items, [g["items"] for g in gathered])
    else:
        plan = SavePlan(described=[g["items"] for g in gathered])
    rank_objects = tuple(g["rank_object"] for g in gathered)

    # Phase 2: write what this rank owns (durable on return).
    error, record = None, None
    try:
        mine = plan.dedup().owned[rank]
        by_key = {it.key: it for it in req.items}
        tensors = [(key, _host(by_key[key].tensor)) for key in mine]
        if tensors:
            record = tier.write_rank_file(
                req.step,
                rank_file_name(rank, compressed=req.zstd_level is not None),
                tensors,
                rank=rank,
                fsync=req.fsync,
                zstd_level=req.zstd_level,
                zstd_threads=req.zstd_threads,
                before_item=req.before_item,
            ).to_json()
    except OSError as e:  # a full or failing disk: name the file, not only the errno
        error = f"cannot write {e.filename or where} ({e.strerror or e})"
    except Exception as e:  # noqa: BLE001 - every rank raises it below
        error = _why(e)  # the rank and the tier are named by whoever reports it
    records = gather_or_raise(coord, error, record, phase="checkpoint write")

    # Phase 3: commit on rank 0: the manifest last.
    error, manifest, manifest_json = None, None, None
    if rank == 0:
        try:
            files = [
                FileRecord.from_json(rank_file_name(r, compressed=rec.get("compression", "none") == "zstd"), rec)
                if rec is not None else None
                for r, rec in enumerate(records)
            ]
            manifest = build_manifest(
                step=req.step, dedup=plan.dedup(), records=files, layout=req.layout, rules=req.rules,
                objects=req.objects, rank_objects=rank_objects, framework=req.framework,
            )
            tier.commit(req.step, manifest, fsync=req.fsync)
            if share and coord.world_size > 1:
                manifest_json = manifest.to_json()
        except Exception as e:  # noqa: BLE001
            error = f"cannot commit {where} ({_why(e)})"
    committed = gather_or_raise(coord, error, manifest_json, phase="checkpoint commit")
    if manifest is not None or not share:
        return manifest
    return Manifest.from_json(committed[0], source=f"{where}/{MANIFEST_NAME}")


def _why(e: BaseException) -> str:
    """An exception as a sentence's cause: its type and text."""
    return f"{type(e).__name__}: {e}"
