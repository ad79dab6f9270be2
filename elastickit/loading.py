"""Loading a checkpoint (from files or from an in-memory snapshot) into a live training state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from elastickit.checkpoint.errors import DataError, RequestError
from elastickit.checkpoint.items import Piece
from elastickit.checkpoint.manifest import Manifest
from elastickit.checkpoint.snapshot import Snapshot
from elastickit.checkpoint.state import (
    PieceRule,
    apply_state,
    flatten_state,
    load_items,
    missing_tensors,
    new_tensor,
)
from elastickit.reshard.executor import execute
from elastickit.reshard.planner import ReshardPlan, plan_reads


def check_names(manifest_objects: Mapping[str, Any], state: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(state) - set(manifest_objects))
    if unknown:
        raise RequestError(
            f"the checkpoint {where} has no state {unknown[0]!r} (it has {sorted(manifest_objects)}); "
            "restore with the names that were saved"
        )


class Loader:
    """One restore of `state` from a committed checkpoint: plan first, then execute.

    Splitting the two lets a caller learn which files the plan reads (to fetch them from peers)
    before any byte is read.
    """

    def __init__(self, manifest: Manifest, state: Mapping[str, Any], rule: PieceRule | None, where: str) -> None:
        check_names(manifest.objects, state, where)
        self.manifest = manifest
        self.state = state
        self.flat, self.sds = flatten_state(state)
        items = load_items(self.flat, rule)
        self.targets = {it.key: it.tensor for it in items}
        wants: list[tuple[str, tuple[Piece, ...]]] = [(it.key, it.pieces) for it in items]
        self.extra: dict[str, torch.Tensor] = {}
        for name in missing_tensors(manifest.objects, self.flat):
            entry = manifest.tensors.get(name)
            if entry is None:
                raise DataError(f"{where}: the manifest tags tensor {name!r} but does not describe it", path=where)
            self.extra[name] = new_tensor(entry.dtype, entry.shape)
            wants.append((name, (Piece.whole(name, (0,) * len(entry.shape), entry.shape),)))
        self.targets.update(self.extra)
        self.plan: ReshardPlan = plan_reads(manifest, wants)

    def files(self) -> set[str]:
        return set(self.plan.files)

    def run(self, ckpt_dir: str) -> None:
        with torch.no_grad():
            execute(self.plan, ckpt_dir, self.manifest, self.targets)
        apply_state(self.state, self.sds, self.manifest.objects, {**self.flat.tensors, **self.extra})


def load_snapshot(snap: Snapshot, state: Mapping[str, Any], rule: PieceRule | None) -> None:
    """Copy an in-memory snapshot of this rank back into the same (unchanged-layout) state."""
    check_names(snap.objects, state, "in memory")
    snap.staged.result()
    flat, sds = flatten_state(state)
    items = {it.key: it for it in load_items(flat, rule)}
    saved = {it.key: it for it in snap.items}
    for key, it in items.items():
        src = saved.get(key)
        if src is None or tuple(src.tensor.shape) != tuple(it.tensor.shape) or src.pieces != it.pieces:
            raise DataError(f"the in-memory snapshot of step {snap.step} does not match tensor {key!r} of this layout")
    with torch.no_grad():
        for key, it in items.items():
            it.tensor.copy_(saved[key].tensor)
    tensors = dict(flat.tensors)
    for name in missing_tensors(snap.objects, flat):
        if name not in saved:
            raise DataError(f"the in-memory snapshot of step {snap.step} lacks tensor {name!r}")
        tensors[name] = saved[name].tensor.clone()
    apply_state(state, sds, snap.objects, tensors)
