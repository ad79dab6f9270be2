"""Restore: the freshest checkpoint across tiers that fits the state and loads, on every rank.

Every rank calls `restore_state` with the same arguments, in the same order; every decision is
made from what all ranks published, so they all return the same step or raise the same error.
The fallback across tiers is the engine's (`checkpoint.drivers.restore.restore_newest`); this
module loads one candidate into a torch state, in two rounds:

1. open: read the manifest and match it against the state (names, global shapes, dtype kinds)
   and plan the reads. A mismatch raises at once on every rank, naming the tensor: it is not
   corruption, and an older checkpoint would not fit either. Unused and missing tensors are
   counted over all ranks (a pipeline stage loads only its own layers); a strict restore raises
   for them, a lenient one reports them.
2. load: fetch peer copies (local tier), read, verify and apply. A missing file or a checksum
   that fails on any rank makes every rank fall back to the next candidate, saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from elastickit.checkpoint.coord import Coordinator, gather_or_raise
from elastickit.checkpoint.drivers.restore import Candidate, restore_newest
from elastickit.checkpoint.errors import DataError, MismatchError, RankFailure, RequestError
from elastickit.checkpoint.events import EventLog
from elastickit.checkpoint.plan.matching import (
    RestoreReport,
    check_fit,
    merge_missing,
    restored_names,
    unused_names,
    used_bitmap,
)
from elastickit.checkpoint.plan.pieces import PieceRule
from elastickit.checkpoint.storage.memory import MemoryTier
from elastickit.checkpoint.storage.tier import Tier
from elastickit.loading import Loader, SnapshotLoader
from elastickit.rng import set_rng_state

log = logging.getLogger("elastickit")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sources:
    """Where one rank's restore looks, and how it talks to the other ranks.

    Attributes:
        coord: the store all-gather of the Checkpointer.
        peer_group: the gloo group for peer fetches (local tier).
        tiers: every tier, fastest first (any `storage.tier.Tier`: this process's memory
            snapshots, a node-local directory, a directory, an object store); a restore tries
            them in this order.
        rule: the resharding rules' piece rule for this rank.
        rng: restore each rank's RNG state when the world size is unchanged.
        root: the Checkpointer's root (for messages).
        events: the event log (rank 0 writes it).
    """

    coord: Coordinator
    peer_group: Any
    tiers: Sequence[Tier]
    rule: PieceRule | None
    rng: bool
    root: str
    events: EventLog


def restore_state(src: Sources, state: Mapping[str, Any], *, step: int | None, strict: bool) -> RestoreReport | None:
    """Load the freshest checkpoint that fits `state` (or `step`); None when there is none."""
    load = lambda cand, what: _restore_one(src, cand, state, strict, what)
    return restore_newest(src.coord, src.tiers, load, events=src.events, root=src.root, step=step)


def _restore_one(src: Sources, cand: Candidate, state: Mapping[str, Any], strict: bool, what: str) -> RestoreReport:
    """Open, match and load one candidate on every rank; RankFailure means: try the next."""
    coord = src.coord
    tier = cand.source
    path = tier.step_where(cand.step)
    loader: Loader | SnapshotLoader | None = None
    names: list[str] = []
    opened: dict[str, Any] = {"error": None, "kind": "", "missing": [], "unused": [], "used": ""}
    try:
        if isinstance(tier, MemoryTier):
            loader = SnapshotLoader(tier.snapshot(cand.step), state, src.rule)
            opened.update(missing=loader.missing, unused=loader.unused)
        else:
            manifest = tier.restore_manifest(coord, cand.step)  # a node-local tier shares it
            loader = Loader(manifest, state, src.rule, path)
            names = restored_names(manifest, state)
            opened.update(missing=loader.missing, used=used_bitmap(names, loader.used))
    except (RequestError, MismatchError) as e:
        kind = "request" if isinstance(e, RequestError) else "mismatch"
        opened.update(error=str(e), kind=kind, tensor=e.tensor, path=e.path)
    except DataError as e:
        opened.update(error=str(e), kind="data")
    got = coord.all_gather(opened, phase=f"restore plan of {what}")
    _raise_failures(got, coord.world_size, what)
    missing = merge_missing(g["missing"] for g in got)
    if isinstance(loader, SnapshotLoader):
        unused = merge_missing(g["unused"] for g in got)
    else:
        unused = unused_names(names, (g["used"] for g in got))
    check_fit(unused, missing, what=f"{what} ({path})", strict=strict)
    assert loader is not None
    error = None
    fetched: list[str] = []
    nbytes = 0
    try:
        if isinstance(loader, SnapshotLoader):
            loader.run()
            rng = (loader.snap.rank_object or {}).get("rng")
            nbytes = loader.snap.nbytes
        else:
            fetched = tier.bring_files(coord, src.peer_group, loader.manifest, loader.files())  # from buddies
            loader.run(tier.open_step(cand.step, loader.manifest))
            nbytes = loader.plan.bytes_read
            m = loader.manifest
            rng = m.rank_objects[coord.rank].get("rng") if m.rank_objects and m.world_size == coord.world_size else None
        if src.rng and rng:
            set_rng_state(rng)
    except DataError as e:
        error = str(e)
    gather_or_raise(coord, error, None, phase=f"restore of {what}")
    return RestoreReport(step=cand.step, tier=cand.tier, path=path, unused=tuple(unused), missing=tuple(missing),
                         bytes=nbytes, fetched=tuple(fetched))


def _raise_failures(got: list[dict[str, Any]], world_size: int, what: str) -> None:
    """Raise what the ranks reported on opening a candidate: a bad request or a mismatch as
    itself (once, the same on every rank), bad data as RankFailure (the caller falls back)."""
    failed = [(r, g) for r, g in enumerate(got) if g["error"]]
    if not failed:
        return
    for kind, cls in (("request", RequestError), ("mismatch", MismatchError)):
        hit = [(r, g) for r, g in failed if g["kind"] == kind]
        if hit:
            rank, g = hit[0]
            more = f" (and {len(hit) - 1} more rank(s))" if len(hit) > 1 else ""
            message = g["error"] if world_size == 1 else f"rank {rank}: {g['error']}{more}"
            raise cls(message, tensor=g.get("tensor"), path=g.get("path"), rank=rank)
    causes = {r: g["error"] for r, g in failed}
    first = min(causes)
    more = f" (and {len(causes) - 1} more rank(s))" if len(causes) > 1 else ""
    message = causes[first] if world_size == 1 else f"opening {what} failed on rank {first}: {causes[first]}{more}"
    raise RankFailure(message, causes=causes)
