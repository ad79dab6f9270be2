"""Restore: the freshest checkpoint across tiers that fits the state and loads, on every rank.

Every rank calls `restore_state` with the same arguments, in the same order; every decision is
made from what all ranks published, so they all return the same step or raise the same error.
For each candidate (freshest first, the faster tier first), two rounds:

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
from elastickit.checkpoint.errors import DataError, MismatchError, RankFailure, RequestError
from elastickit.checkpoint.events import EventLog
from elastickit.checkpoint.plan.matching import (
    RestoreReport,
    check_fit,
    describe_gap,
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
    coord = src.coord
    mine = {t.name: t.inventory(coord.rank) for t in src.tiers}
    found = candidates(coord.all_gather(mine, phase="restore inventory"), src.tiers)
    if step is not None:
        found = [c for c in found if c.step == step]
        if not found:
            raise RequestError(f"no tier holds a committed checkpoint of step {step} under {src.root}")
    reasons: list[str] = []
    for cand in found:
        what = f"step {cand.step} on the {cand.tier} tier"
        if cand.unservable:  # committed, but the tier cannot serve it whole: skipped like a failure
            reasons.append(f"{what}: {cand.unservable}")
            log.warning("elastickit: cannot restore %s (%s); trying the next", what, cand.unservable)
            if coord.rank == 0:
                src.events.emit("restore_fallback", step=cand.step, tier=cand.tier, reason=cand.unservable)
            continue
        try:
            report = _restore_one(src, cand, state, strict, what)
        except RankFailure as e:
            reasons.append(f"{what}: {e}")
            log.warning("elastickit: cannot restore %s (%s); trying the next", what, e)
            if coord.rank == 0:
                src.events.emit("restore_fallback", step=cand.step, tier=cand.tier, reason=str(e))
            continue
        if coord.rank == 0:
            gap = {"unused": len(report.unused), "missing": len(report.missing)} if report.unused or report.missing else {}
            src.events.emit("restore", step=cand.step, tier=cand.tier, path=report.path, skipped=reasons, **gap)
        if report.unused or report.missing:
            log.warning("elastickit: restored %s with strict=False: %s; they were skipped", what, describe_gap(report.unused, report.missing))
        log.info("elastickit: restored %s (%s)", what, report.path)
        return report
    if reasons:
        raise DataError(f"no checkpoint under {src.root} could be restored: {'; '.join(reasons)}", path=src.root)
    return None


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A checkpoint some tier can serve: its step, the tier's name, and the tier. `unservable`:
    why the tier holds the step committed but cannot serve it whole (the restore skips it,
    saying so)."""

    step: int
    tier: str
    source: Tier
    unservable: str = ""


def candidates(gathered: list[dict[str, Any]], tiers: Sequence[Tier]) -> list[Candidate]:
    """Every restorable (step, tier), freshest first, the faster tier first for equal steps.

    `gathered[r]` is rank r's inventory: {<tier name>: tier.inventory(r)}. A tier says itself
    what it can serve (memory: the snapshots every rank holds), and what it holds but cannot
    serve (a candidate with `unservable` set, in the same order).
    """
    out: list[tuple[int, int, Candidate]] = []
    for order, t in enumerate(tiers):
        inventories = [g.get(t.name) for g in gathered]
        for step in t.restorable(inventories):
            out.append((-step, order, Candidate(step=step, tier=t.name, source=t)))
        for step, why in t.unservable(inventories).items():
            out.append((-step, order, Candidate(step=step, tier=t.name, source=t, unservable=why)))
    return [c for _, _, c in sorted(out, key=lambda x: (x[0], x[1]))]


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
