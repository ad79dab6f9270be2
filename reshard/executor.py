"""The executor: carries out a ReshardPlan by streaming slices of memory-mapped source files.

One source file is open at a time; each stored tensor a read touches is verified against its
checksum once, then the needed boxes are copied straight from the mapping into the target
tensors, and the stored tensor's mapped pages are given back (reads are sorted by key, so each is
touched once). Extra memory is bounded by one stored tensor's mapped pages or, for a compressed
file, its decompressed bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from elastickit.checkpoint.errors import DataError
from elastickit.checkpoint.manifest import FileRecord, Manifest
from elastickit.checkpoint.stfile import StFile

from .planner import ReadOp, ReshardPlan


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
    ckpt_dir: str,
    manifest: Manifest,
    targets: Mapping[str, torch.Tensor],
    *,
    verify: bool = True,
    open_file: Callable[[str, FileRecord], Any] | None = None,
) -> ExecReport:
    """Fill `targets` (key -> tensor, written in place) as `plan` says.

    The source files are `ckpt_dir/<file>`, memory-mapped; `open_file(name, record)` opens them
    elsewhere instead (an object store's ranged reads: `checkpoint.objstore.ObjectRoot.opener`),
    returning a context manager with StFile's `tensor` and `release`.

    Replicas merge as the manifest says: `first` copies, `average` averages every copy, `check`
    raises DataError if copies differ.
    """
    by_file: dict[str, list[ReadOp]] = {}
    for r in plan.reads:
        by_file.setdefault(r.file, []).append(r)
    copied = 0
    acc: dict[tuple[str, tuple[int, ...], tuple[int, ...]], int] = {}
    for fname in sorted(by_file):
        record = manifest.files.get(fname)
        if record is None:
            raise DataError(f"the manifest of {ckpt_dir} lists no file {fname!r}", path=ckpt_dir)
        opened = (
            open_file(fname, record) if open_file is not None else StFile(os.path.join(ckpt_dir, fname), record, verify=verify)
        )
        with opened as f:
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
