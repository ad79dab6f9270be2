"""Loading a checkpoint (from files or from an in-memory snapshot) into a live training state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from elastickit.checkpoint.drivers.snapshot import Snapshot
from elastickit.checkpoint.errors import DataError, RequestError
from elastickit.checkpoint.format.items import Piece
from elastickit.checkpoint.format.manifest import Manifest
from elastickit.checkpoint.plan.matching import check_specs, compare_specs, memory_gap
from elastickit.checkpoint.plan.pieces import PieceRule, load_items
from elastickit.reshard.executor import StepSource, execute
from elastickit.reshard.planner import ReshardPlan, plan_reads
from elastickit.state import apply_state, flatten_state, missing_tensors, new_tensor


def check_names(manifest_objects: Mapping[str, Any], state: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(state) - set(manifest_objects))
    if unknown:
        raise RequestError(
            f"the checkpoint {where} has no state {unknown[0]!r} (it has {sorted(manifest_objects)}); "
            "restore with the names that were saved"
        )


class Loader:
    """One restore of `state` from a committed checkpoint: match, plan, then execute.

    Construction matches the state against the manifest (raising MismatchError for a shape or
    dtype that differs) and plans the reads; `missing` and `used` say what this rank lacks and
    what it loads, for the caller to decide, with the other ranks, whether the restore is
    strict enough. Splitting plan and execution also lets a caller learn which files the plan
    reads (to fetch them from peers) before any byte is read.
    """

    def __init__(self, manifest: Manifest, state: Mapping[str, Any], rule: PieceRule | None, where: str) -> None:
        check_names(manifest.objects, state, where)
        self.manifest = manifest
        self.state = state
        self.flat, self.sds = flatten_state(state)
        items = load_items(self.flat.tensors, rule)
        lacking = {p.logical for it in items for p in it.pieces if p.logical not in manifest.tensors}
        self.missing = sorted(lacking.union(check_specs(manifest, (s for it in items for s in it.specs), where)))
        gone = set(self.missing)
        self.targets = {it.key: it.tensor for it in items}
        wants: list[tuple[str, tuple[Piece, ...]]] = [
            (it.key, tuple(p for p in it.pieces if p.logical not in gone)) for it in items
        ]
        self.extra: dict[str, torch.Tensor] = {}
        for name in missing_tensors(manifest.objects, self.flat):
            entry = manifest.tensors.get(name)
            if entry is None:
                raise DataError(f"{where}: the manifest tags tensor {name!r} but does not describe it", path=where)
            self.extra[name] = new_tensor(entry.dtype, entry.shape)
            wants.append((name, (Piece.whole(name, (0,) * len(entry.shape), entry.shape),)))
        self.targets.update(self.extra)
        self.used = {p.logical for _, pieces in wants for p in pieces}
        self.plan: ReshardPlan = plan_reads(manifest, wants)

    def files(self) -> set[str]:
        return set(self.plan.files)

    def run(self, source: StepSource) -> None:
        """Read the plan from `source` (the step whose manifest this loader matched) and load it."""
        with torch.no_grad():
            execute(self.plan, source, self.targets)
        apply_state(self.state, self.sds, self.manifest.objects, {**self.flat.tensors, **self.extra})


class SnapshotLoader:
    """One restore of `state` from this rank's in-memory snapshot (the layout must not have
    changed: a tensor of another shape raises DataError, and restore falls back to a file tier,
    which reshards). `unused` and `missing` compare the two by name."""

    def __init__(self, snap: Snapshot, state: Mapping[str, Any], rule: PieceRule | None) -> None:
        check_names(snap.objects, state, "in memory")
        snap.staged.result()
        self.snap, self.state = snap, state
        self.flat, self.sds = flatten_state(state)
        self.items = {it.key: it for it in load_items(self.flat.tensors, rule)}
        self.saved = {it.key: it for it in snap.items}
        # Another model is a mismatch (raised); another layout only needs a file tier (below).
        specs = {s.name: (s.dtype, s.shape) for it in snap.items for s in it.specs}
        compare_specs(specs, (s for it in self.items.values() for s in it.specs), f"the in-memory snapshot of step {snap.step}")
        for key, it in self.items.items():
            src = self.saved.get(key)
            if src is not None and (tuple(src.tensor.shape) != tuple(it.tensor.shape) or src.pieces != it.pieces):
                raise DataError(f"the in-memory snapshot of step {snap.step} does not match tensor {key!r} of this layout")
        self.extra = [n for n in missing_tensors(snap.objects, self.flat) if n in self.saved]
        wanted = set(state)
        restored = {k: v for k, v in self.saved.items() if k.split("/", 1)[0] in wanted}
        self.unused, self.missing = memory_gap(restored, {**self.items, **dict.fromkeys(self.extra)})

    def run(self) -> None:
        with torch.no_grad():
            for key, it in self.items.items():
                if key in self.saved:
                    it.tensor.copy_(self.saved[key].tensor)
        tensors = dict(self.flat.tensors)
        for name in missing_tensors(self.snap.objects, self.flat):
            if name not in self.saved:
                raise DataError(f"the in-memory snapshot of step {self.snap.step} lacks tensor {name!r}")
            tensors[name] = self.saved[name].tensor.clone()
        apply_state(self.state, self.sds, self.snap.objects, tensors)
