"""The save plan: who writes which box, and the manifest that indexes what they wrote.

Pure functions of plain data, the same on every rank. A save gathers every rank's description
of what it holds (`describe_items`), computes the same deduplication everywhere (`plan_dedup`:
each logical box is written once, by the lowest rank that holds it), and once every rank has
written its file, rank 0 indexes the result (`build_manifest`). The save driver
(`checkpoint.drivers.save`), offline resharding and conversion (`elastickit.reshard`) all plan
through here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..format.items import LogicalSpec, Piece
from ..format.manifest import FileRecord, LayoutRecord, Manifest, ShardRef, TensorEntry


class Holding(Protocol):
    """A physical tensor as the plan sees it (a `SaveItem`, or a tensor an offline tool will write)."""

    @property
    def key(self) -> str: ...

    @property
    def pieces(self) -> tuple[Piece, ...]: ...

    @property
    def specs(self) -> tuple[LogicalSpec, ...]: ...


def describe_items(items: Iterable[Holding]) -> list[dict[str, Any]]:
    """What a rank publishes about its tensors for the plan (JSON: it crosses the store)."""
    return [
        {
            "key": it.key,
            "pieces": [[p.logical, list(p.offsets), list(p.lengths), list(p.stored_offsets)] for p in it.pieces],
            "specs": [[s.name, s.dtype, list(s.shape), s.merge] for s in it.specs],
        }
        for it in items
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class Dedup:
    """Who writes what.

    Attributes:
        specs: every logical tensor, by name.
        owned: per rank, physical key -> the (piece, replica) pairs that rank writes; a rank
            whose dict is empty writes no file.
    """

    specs: dict[str, LogicalSpec]
    owned: list[dict[str, list[tuple[Piece, int]]]]


def plan_dedup(described: Sequence[Sequence[Mapping[str, Any]]]) -> Dedup:
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
    return Dedup(specs=specs, owned=owned)


@dataclass(frozen=True)
class SavePlan:
    """What every rank holds, gathered once per checkpoint, and who writes what."""

    described: list[list[dict[str, Any]]]

    def dedup(self) -> Dedup:
        """The deduplication of `described`, computed once (every tier uses it)."""
        got = self.__dict__.get("_dedup")
        if got is None:
            got = plan_dedup(self.described)
            object.__setattr__(self, "_dedup", got)
        return got


def _same_items(a: Sequence[Holding], b: Sequence[Holding]) -> bool:
    return len(a) == len(b) and all(
        x.key == y.key and x.pieces is y.pieces and x.specs is y.specs for x, y in zip(a, b, strict=True)
    )


class PlanCache:
    """The plan of the last commit of a sequence (one per tier): a rank describes its items
    only when they changed since, and the deduplication is computed again only then."""

    def __init__(self) -> None:
        self._items: Sequence[Holding] | None = None
        self._described: list[list[dict[str, Any]]] = []
        self._plan: SavePlan | None = None

    def describe(self, items: Sequence[Holding]) -> list[dict[str, Any]] | None:
        """This rank's description for the plan round, or None when unchanged."""
        if self._items is not None and _same_items(self._items, items):
            return None
        return describe_items(items)

    def update(self, items: Sequence[Holding], gathered: list[list[dict[str, Any]] | None]) -> SavePlan:
        """The plan, from every rank's description (None: the rank's previous one)."""
        if self._plan is None or any(d is not None for d in gathered):
            self._described = [d if d is not None else self._described[r] for r, d in enumerate(gathered)]
            self._plan = SavePlan(described=self._described)
        self._items = items
        return self._plan


def build_manifest(
    *,
    step: int,
    dedup: Dedup,
    records: Sequence[FileRecord | None],
    layout: LayoutRecord,
    rules: Sequence[Mapping[str, Any]] = (),
    objects: Mapping[str, Any] | None = None,
    rank_objects: Sequence[Mapping[str, Any]] | None = None,
    framework: Mapping[str, str] | None = None,
) -> Manifest:
    """The manifest of a checkpoint whose rank r wrote `records[r]` (None: no file) as `dedup`
    says. `rank_objects` defaults to an empty object per rank."""
    world_size = len(records)
    if len(dedup.owned) != world_size:
        raise ValueError(f"the plan has {len(dedup.owned)} ranks but {world_size} file records were given")
    files: dict[str, FileRecord] = {}
    for rank, rec in enumerate(records):
        if rec is not None:
            files[rec.name] = rec
        elif dedup.owned[rank]:
            raise ValueError(f"rank {rank} owns tensors but wrote no file")
    shards: dict[str, list[ShardRef]] = {name: [] for name in dedup.specs}
    for rank, mine in enumerate(dedup.owned):
        if not mine:
            continue
        rec = records[rank]
        assert rec is not None
        for key, pieces in mine.items():
            for piece, replica in pieces:
                shards[piece.logical].append(
                    ShardRef(
                        file=rec.name,
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
        for name, spec in dedup.specs.items()
    }
    return Manifest(
        step=step,
        created_s=time.time(),
        world_size=world_size,
        layout=layout,
        rules=tuple(dict(r) for r in rules),
        tensors=tensors,
        files=files,
        objects=dict(objects or {}),
        rank_objects=tuple(dict(o) for o in rank_objects) if rank_objects is not None else ({},) * world_size,
        framework=dict(framework or {}),
    )


__all__ = [
    "Dedup",
    "Holding",
    "PlanCache",
    "SavePlan",
    "build_manifest",
    "describe_items",
    "plan_dedup",
]
