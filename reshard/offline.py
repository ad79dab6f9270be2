"""Offline resharding: plan and write a checkpoint for another layout without the model.

`elastickit reshard SRC DST --to LAYOUT [--rules FILE]` lands here; like `convert`, it writes a
new checkpoint root `DST/step-<step>/` that a job resumes from. Without the model, the
target's physical tensors are derived from the source manifest: every stored key of the source
is one physical tensor (a fused key keeps its parts together); the target rules say how it is
split over the target layout (`shard`, `pad`, `fused`, ...); a tensor no rule matches is
replicated (written once). Names stay global: pipeline renames apply when a job restores.

Each target rank is planned with `plan_reads` (pure), then filled by `execute` and written
one rank at a time, so memory holds one target rank's tensors, never the whole model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from elastickit.checkpoint.errors import RequestError
from elastickit.checkpoint.format.directory import StepDir, resolve
from elastickit.checkpoint.format.integrity import commit_step, fsync_dir
from elastickit.checkpoint.format.items import LogicalSpec, Piece
from elastickit.checkpoint.format.manifest import (
    DTYPE_SIZES,
    FileRecord,
    Manifest,
    rank_file_name,
    step_dir_name,
)
from elastickit.checkpoint.format.stfile import torch_dtype, write_file
from elastickit.checkpoint.plan.save import build_manifest, describe_items, plan_dedup

from .destination import check_destination, staged_output
from .executor import StepSource, execute
from .layout import ParallelLayout, axis_sizes
from .planner import ReshardPlan, plan_reads
from .rules import Fused, Pad, Rule, RuleSet


@dataclass(frozen=True, slots=True, kw_only=True)
class PhysicalTensor:
    """A target physical tensor of one rank: key, local shape, dtype and the boxes it holds."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]
    specs: tuple[LogicalSpec, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True, slots=True, kw_only=True)
class RankPlan:
    """One target rank: its physical tensors and the reads that fill them."""

    rank: int
    tensors: tuple[PhysicalTensor, ...]
    plan: ReshardPlan

    @property
    def target_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def peak_bytes(self) -> int:
        """Target tensors plus the executor's bounded buffer (one stored source tensor)."""
        return self.target_bytes + self.plan.peak_bytes


def _physical_groups(manifest: Manifest) -> dict[str, list[str]]:
    """Target physical name -> the logical tensors it holds, from the source's stored keys."""
    groups: dict[tuple[str, str], set[str]] = {}
    for t in manifest.tensors.values():
        for s in t.shards:
            groups.setdefault((s.file, s.key), set()).add(t.name)
    out: dict[str, set[str]] = {}
    for (_, key), names in sorted(groups.items()):
        # A renamed key (a pipeline stage's local name) names the tensor by its global name;
        # fused parts (`<name>:<part>`) keep their common stem.
        stems = {n.rpartition(":")[0] for n in names}
        if key in names:
            base = key
        elif len(stems) == 1 and "" not in stems:  # fused parts `<name>:<part>`
            base = stems.pop()
        elif len(names) == 1:
            base = next(iter(names))
        else:
            base = key
        out.setdefault(base, set()).update(names)
    return {k: sorted(v) for k, v in out.items()}


def _global_shape(
    rule: Rule | None, base: str, names: list[str], manifest: Manifest, sizes: dict[str, int]
) -> tuple[int, ...]:
    op = next((o for o in rule.ops if isinstance(o, Pad | Fused)), None) if rule else None
    if isinstance(op, Fused):
        parts = {op.name_format.format(name=base, part=p): n for p, n in op.parts}
        missing = [n for n in parts if n not in manifest.tensors]
        if missing:
            raise RequestError(
                f"rule {rule.label!r} fuses {missing}, which the checkpoint lacks", tensor=base
            )  # type: ignore[union-attr]
        shape = list(manifest.tensors[next(iter(parts))].shape)
        _check_dims(rule, base, shape)  # type: ignore[arg-type]
        shape[op.dim] = sum(parts.values())
        return tuple(shape)
    if base not in manifest.tensors:
        raise RequestError(
            f"the checkpoint stores {names} in one tensor but no target rule fuses them under {base!r}; "
            "pass the rules that describe it with --rules",
            tensor=base,
        )
    shape = list(manifest.tensors[base].shape)
    if rule is not None:
        _check_dims(rule, base, shape)
    if isinstance(op, Pad):
        shape[op.dim] = op.padded(sizes)
    return tuple(shape)


def _check_dims(rule: Rule, base: str, shape: list[int]) -> None:
    """Every dim a rule names exists in the tensor it matched (else one sentence, not an
    IndexError)."""
    for op in rule.ops:
        dim = getattr(op, "dim", None)
        if dim is not None and dim >= len(shape):
            kind = type(op).__name__.lower()
            raise rule.fail(
                base,
                f"{kind}.dim is {dim} but the tensor has {len(shape)} dim(s) (shape {shape}); "
                f"use a dim from 0 to {len(shape) - 1}" if shape else
                f"{kind}.dim is {dim} but the tensor is a scalar; drop the {kind} operation",
            )


def target_tensors(
    manifest: Manifest, layout: ParallelLayout, rules: RuleSet, rank: int
) -> list[PhysicalTensor]:
    """The physical tensors target `rank` of `layout` holds under `rules` (no bytes touched)."""
    record = layout.to_record()
    piece_rule = rules.piece_rule(record, rank)
    sizes = axis_sizes(record)
    out = []
    for base, names in _physical_groups(manifest).items():
        rule = rules.match(base)
        gshape = _global_shape(rule, base, names, manifest, sizes)
        local = list(gshape)
        if rule is not None:
            for s in rule._shards():
                n = sizes[s.axis]
                if local[s.dim] % n:
                    raise RequestError(
                        f"tensor {base!r} has {local[s.dim]} rows along dim {s.dim}, which do not split "
                        f"evenly over {s.axis}={n}; choose a layout that divides it",
                        tensor=base,
                    )
                local[s.dim] //= n
        dtype = manifest.tensors[names[0]].dtype
        meta = torch.empty(local, dtype=torch_dtype(dtype), device="meta")
        got = piece_rule(base, meta)
        if got is None:
            spec = manifest.tensors[base]
            got = (
                (Piece.whole(base, (0,) * len(gshape), gshape),),
                (LogicalSpec(name=base, dtype=dtype, shape=gshape, merge=spec.merge),),
            )
        pieces, specs = got
        out.append(
            PhysicalTensor(key=base, shape=tuple(local), dtype=dtype, pieces=pieces, specs=specs)
        )
    return out


Progress = Callable[[str, int, int], None]
"""`(phase, done, total)`, called as long work advances (the CLI draws a progress bar)."""


def check_world(manifest: Manifest, layout: ParallelLayout) -> None:
    """Refuse a target world far past what the checkpoint's tensors can use: more ranks than
    the checkpoint has elements in all (such a plan only burns time and memory)."""
    elements = sum(math.prod(t.shape) for t in manifest.tensors.values())
    if layout.world_size > max(elements, 1):
        raise RequestError(
            f"the target layout {layout} has {layout.world_size:,} ranks, but the checkpoint holds "
            f"only {elements:,} elements in all, so most ranks would hold nothing of it; choose a "
            f"layout of at most {elements:,} ranks"
        )


def _rank_axes(rules: RuleSet, bases: Iterable[str]) -> tuple[str, ...]:
    """The axes whose coordinate changes what a rank holds: the axes the rules matching the
    checkpoint's tensors name (shard, expert, rename, flat, pad). Every other axis only
    replicates, so ranks that agree on these axes hold the same tensors and share one plan."""
    axes: set[str] = set()
    for base in bases:
        r = rules.match(base)
        for op in r.ops if r is not None else ():
            axis = getattr(op, "axis", None)
            if axis is not None:
                axes.add(axis)
    return tuple(sorted(axes))


def plan_reshard(
    manifest: Manifest, layout: ParallelLayout, rules: RuleSet, *, on_progress: Progress | None = None
) -> list[RankPlan]:
    """Plan every target rank (pure: reads only the manifest).

    Ranks that differ only along axes that replicate share one plan (planned once), so a wide
    data-parallel layout costs one plan per distinct shard, not one per rank. A world larger
    than the checkpoint's element count is refused (`check_world`)."""
    check_world(manifest, layout)
    axes = _rank_axes(rules, _physical_groups(manifest))
    shared: dict[tuple[int, ...], tuple[tuple[PhysicalTensor, ...], ReshardPlan]] = {}
    plans = []
    total = layout.world_size
    for rank in range(total):
        coords = layout.coords(rank)
        key = tuple(coords[a] for a in axes)
        if key not in shared:
            tensors = tuple(target_tensors(manifest, layout, rules, rank))
            wants = [(t.key, t.pieces) for t in tensors]
            shared[key] = (tensors, plan_reads(manifest, wants, who=f"rank {rank} of {layout}"))
        tensors, plan = shared[key]
        plans.append(RankPlan(rank=rank, tensors=tensors, plan=plan))
        if on_progress is not None:
            on_progress("planning", rank + 1, total)
    return plans


def reshard_checkpoint(
    src: str,
    dst: str,
    layout: ParallelLayout,
    rules: RuleSet,
    *,
    fsync: bool = True,
    on_progress: Progress | None = None,
) -> Manifest:
    """Write checkpoint `src` (a step directory, or a root: its newest) to the new root `dst`
    laid out for `layout`, one target rank at a time: `dst/step-<8 digits>/`, the step of the
    source, so that `Checkpointer(dst)` and `train --ckpt dst` resume from it.

    `dst` must be new or empty and outside the source; it appears only when complete."""
    return reshard_step(StepDir(resolve(src)), dst, layout, rules, protect=[src], fsync=fsync, on_progress=on_progress)


def reshard_step(
    source: StepSource,
    dst: str,
    layout: ParallelLayout,
    rules: RuleSet,
    *,
    protect: Sequence[str] = (),
    fsync: bool = True,
    on_progress: Progress | None = None,
) -> Manifest:
    """`reshard_checkpoint` of a step read through `source` (a directory, or a step a tier
    opened). `dst` may lie neither inside `source.where` nor inside any path of `protect`."""
    check_destination([*protect, source.where], dst)
    manifest = source.manifest
    plans = plan_reshard(manifest, layout, rules, on_progress=on_progress)
    with staged_output([*protect, source.where], dst, fsync=fsync) as root:
        step_dir = os.path.join(root, step_dir_name(manifest.step))
        os.makedirs(step_dir)
        out = _write_ranks(
            source, step_dir, plans, layout, rules, fsync=fsync, on_progress=on_progress
        )
    return out


def _write_ranks(
    source: StepSource,
    dst: str,
    plans: list[RankPlan],
    layout: ParallelLayout,
    rules: RuleSet,
    *,
    fsync: bool,
    on_progress: Progress | None,
) -> Manifest:
    manifest = source.manifest
    shared: dict[int, list[dict[str, Any]]] = {}  # ranks that share a plan share its description
    described = [shared.setdefault(id(p.tensors), describe_items(p.tensors)) for p in plans]
    dedup = plan_dedup(described)
    owned = dedup.owned
    records: list[FileRecord | None] = []
    for p in plans:
        if on_progress is not None:
            on_progress("writing", p.rank, len(plans))
        mine = owned[p.rank]
        if not mine:
            records.append(None)
            continue
        wanted = [t for t in p.tensors if t.key in mine]
        targets = {t.key: torch.zeros(t.shape, dtype=torch_dtype(t.dtype)) for t in wanted}
        sub = plan_reads(manifest, [(t.key, t.pieces) for t in wanted])
        with torch.no_grad():
            execute(sub, source, targets)
        rec = write_file(
            os.path.join(dst, rank_file_name(p.rank)),
            list(targets.items()),
            rank=p.rank,
            fsync=fsync,
        )
        records.append(rec)
        del targets
    out = build_manifest(
        step=manifest.step,
        dedup=dedup,
        records=records,
        layout=layout.to_record(),
        rules=rules.to_json(),
        objects=manifest.objects,
        framework={**manifest.framework, "resharded_from": source.where},
    )
    if on_progress is not None:
        on_progress("writing", len(plans), len(plans))
    if fsync:
        fsync_dir(dst)
    commit_step(dst, out, fsync=fsync)
    return out
