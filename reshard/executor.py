"""The executor: carries out a ReshardPlan by streaming slices of a checkpoint's stored tensors.

It reads through `StepSource`, the shape every reader of a committed step has (a step directory,
`elastickit.checkpoint.format.directory.StepDir`; a tier's step, from `Tier.open_step`): the
executor never builds a path, so a step held anywhere reads the same way. One source file is
open at a time; each stored tensor a read touches is verified against its
checksum once, then the needed boxes are copied straight from the mapping into the target
tensors, and the stored tensor's mapped pages are given back (reads are sorted by key, so each is
touched once). Extra memory is bounded by one stored tensor's mapped pages or, for a compressed
file, its decompressed bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
from elastickit.checkpoint.errors import DataError
from elastickit.checkpoint.format.manifest import FileRecord, Manifest

from .planner import ReadOp, ReshardPlan


class StoredTensors(Protocol):
    """One open file of a step: its stored tensors by key, verified on first access."""

    def tensor(self, key: str) -> torch.Tensor:
        """The stored tensor `key` (a view; verified against the manifest's checksum)."""
        ...

    def release(self, key: str) -> None:
        """Done with `key`: its memory may be given back."""
        ...


class StepSource(Protocol):
    """A committed step as the executor reads it.

    Attributes:
        manifest: the step's manifest.
        where: what messages call the step (a path or a URL).
    """

    manifest: Manifest
    where: str

    def open(self, name: str, record: FileRecord, *, verify: bool = True) -> AbstractContextManager[StoredTensors]:
        """File `name` of the step (raises CorruptCheckpointError when it is missing or damaged)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecReport:
    """What the executor did: files opened and bytes copied."""

    files_opened: int
    bytes_copied: int


def _box(t: torch.Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        t = t.narrow(dim, o, n)
    return t


def execute(
    plan: ReshardPlan,
    source: StepSource,
    targets: Mapping[str, torch.Tensor],
    *,
    verify: bool = True,
) -> ExecReport:
    """Fill `targets` (key -> tensor, written in place) as `plan` says, reading from `source`
    (a step directory, memory-mapped; an object store's step, by ranged reads; any tier's step).

    Replicas merge as the manifest says: `first` copies, `average` averages every copy, `check`
    raises DataError if copies differ.
    """
    by_file: dict[str, list[ReadOp]] = {}
    for r in plan.reads:
        by_file.setdefault(r.file, []).append(r)
    manifest = source.manifest
    copied = 0
    acc: dict[tuple[str, tuple[int, ...], tuple[int, ...]], int] = {}
    for fname in sorted(by_file):
        record = manifest.files.get(fname)
        if record is None:
            raise DataError(f"the manifest of {source.where} lists no file {fname!r}", path=source.where)
        with source.open(fname, record, verify=verify) as f:
            reads = by_file[fname]
            if hasattr(f, "will_read"):  # a ranged reader fetches what comes next together
                f.will_read([r.key for r in reads])
            for i, r in enumerate(reads):
                dst = targets.get(r.target)
                if dst is None:
                    raise KeyError(f"plan names target {r.target!r}, which was not given")
                src = _box(f.tensor(r.key), r.stored_offsets, r.lengths)
                view = _box(dst, r.target_offsets, r.lengths)
                merge = manifest.tensors[r.logical].merge
                if r.replica == 0 or merge == "first":
                    view.copy_(src)
                elif merge == "check":
                    if not torch.equal(view, src.to(view.dtype)):
                        raise DataError(
                            f"replicas of {r.logical!r} differ (copy {r.replica} in {fname}); "
                            "the rule says merge=check, so the checkpoint is inconsistent",
                            tensor=r.logical,
                        )
                else:  # average: sum now, divide once all replicas are in
                    view.add_(src.to(view.dtype))
                    k = (r.target, r.target_offsets, r.lengths)
                    acc[k] = acc.get(k, 1) + 1
                copied += r.nbytes
                if i + 1 == len(reads) or reads[i + 1].key != r.key:
                    del src
                    f.release(r.key)  # done with this stored tensor: resident memory stays bounded
    for (target, offsets, lengths), count in acc.items():
        _box(targets[target], offsets, lengths).div_(count)
    return ExecReport(files_opened=len(by_file), bytes_copied=copied)
