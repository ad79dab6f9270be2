"""The planner: which bytes of a checkpoint each target tensor needs (DESIGN.md section 3).

A pure function of data: the source manifest and the boxes a target rank wants (from its layout
and rules, as `Piece`s). It reads no tensor bytes and needs no process group, so `--dry-run` and
unit tests are free. The executor (`executor.py`) carries the plan out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from elastickit.checkpoint.errors import DataError
from elastickit.checkpoint.format.items import Piece
from elastickit.checkpoint.format.manifest import DTYPE_SIZES, Manifest


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadOp:
    """Copy a box of a stored source tensor into a box of a target tensor.

    Attributes:
        file: the source file (inside the checkpoint directory).
        key: the stored tensor's key in that file.
        stored_offsets: where the box starts in the stored tensor.
        target: the target tensor's key.
        target_offsets: where the box starts in the target tensor.
        lengths: the box's extent.
        logical: the logical tensor it belongs to (for messages and merges).
        replica: the source replica (0 unless the tensor merges replicas).
        nbytes: the box's size in bytes.
    """

    file: str
    key: str
    stored_offsets: tuple[int, ...]
    target: str
    target_offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    logical: str
    replica: int
    nbytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReshardPlan:
    """All reads of one target rank, grouped by file in a stable order.

    Attributes:
        reads: the copies, sorted by (file, key, replica).
        bytes_needed: bytes the target boxes take (what is copied).
        bytes_read: bytes of the stored tensors touched (each is read and verified whole).
        peak_bytes: an upper bound of the extra memory the executor holds at once besides the
            targets (the largest stored tensor: one mapped or decompressed source at a time).
    """

    reads: tuple[ReadOp, ...]
    bytes_needed: int
    bytes_read: int
    peak_bytes: int

    @property
    def files(self) -> list[str]:
        return sorted({r.file for r in self.reads})


def plan_reads(
    manifest: Manifest,
    wants: Sequence[tuple[str, Sequence[Piece]]],
    *,
    strict: bool = True,
    who: str = "",
) -> ReshardPlan:
    """Plan the reads that fill each wanted box from the checkpoint `manifest` describes.

    `wants` pairs a target tensor's key with the logical boxes it needs. Strict by default: a
    box that the checkpoint does not cover completely raises DataError naming the tensor; with
    `strict=False` the uncovered parts are left alone (the caller reports them). `who` names
    the target in messages (e.g. "rank 1 of tp=2").
    """
    reads: list[ReadOp] = []
    needed = 0
    for target, pieces in wants:
        for want in pieces:
            entry = manifest.tensors.get(want.logical)
            if entry is None:
                if strict:
                    raise DataError(
                        f"the checkpoint has no tensor {want.logical!r} (needed by {target!r}); "
                        "check the names or map them with a rename rule",
                        tensor=want.logical,
                    )
                continue
            if len(want.offsets) != len(entry.shape) or any(
                o + n > g for o, n, g in zip(want.offsets, want.lengths, entry.shape, strict=True)
            ):
                raise DataError(_misfit(target, want, list(entry.shape), who), tensor=want.logical)
            esize = DTYPE_SIZES[entry.dtype]
            covered = 0
            for s in entry.shards:
                if s.replica and entry.merge == "first":
                    continue
                lo = tuple(max(a, b) for a, b in zip(want.offsets, s.offsets, strict=True))
                hi = tuple(
                    min(a + n, b + m)
                    for a, n, b, m in zip(want.offsets, want.lengths, s.offsets, s.lengths, strict=True)
                )
                lengths = tuple(h - low for low, h in zip(lo, hi, strict=True))
                if any(n <= 0 for n in lengths) and lengths:
                    continue
                numel = math.prod(lengths)
                if s.replica == 0:
                    covered += numel
                reads.append(
                    ReadOp(
                        file=s.file,
                        key=s.key,
                        stored_offsets=tuple(
                            so + (low - b) for so, low, b in zip(s.stored_offsets, lo, s.offsets, strict=True)
                        ),
                        target=target,
                        target_offsets=tuple(
                            t + (low - a) for t, low, a in zip(want.stored_offsets, lo, want.offsets, strict=True)
                        ),
                        lengths=lengths,
                        logical=want.logical,
                        replica=s.replica,
                        nbytes=numel * esize,
                    )
                )
            needed += want.numel * esize
            if strict and covered != want.numel:
                raise DataError(
                    f"the checkpoint covers {covered} of the {want.numel} elements of "
                    f"{want.logical!r} that {target!r} needs (offsets {list(want.offsets)}, lengths "
                    f"{list(want.lengths)}); it is incomplete or was written with other rules",
                    tensor=want.logical,
                )
    reads.sort(key=lambda r: (r.file, r.key, r.replica, r.target, r.target_offsets))
    key_bytes = _stored_sizes(manifest)
    touched = {(r.file, r.key) for r in reads}
    bytes_read = sum(key_bytes.get(k, 0) for k in touched)
    peak = max((key_bytes.get(k, 0) for k in touched), default=0)
    return ReshardPlan(reads=tuple(reads), bytes_needed=needed, bytes_read=bytes_read, peak_bytes=peak)


def _misfit(target: str, want: Piece, shape: list[int], who: str) -> str:
    """One sentence for a target box that the checkpoint's tensor cannot hold."""
    holder = f"on {who}, the target" if who else "the model's"
    part = "" if target == want.logical else f" (its part {want.logical!r})"
    box = "[" + ", ".join(f"{o}:{o + n}" for o, n in zip(want.offsets, want.lengths, strict=True)) + "]"
    if len(want.offsets) != len(shape):
        found = f"is {len(want.offsets)}-dimensional ({box})"
    else:
        least = [max(g, o + n) for o, n, g in zip(want.offsets, want.lengths, shape, strict=True)]
        found = f"needs elements {box}, so a shape of at least {least}"
    return (
        f"{holder} tensor {target!r}{part} {found}, but the checkpoint's {want.logical!r} has shape "
        f"{shape}: they are different models (size or config); restore into the model that saved "
        "the checkpoint, or check the model's config and the rules"
    )


def _stored_sizes(manifest: Manifest) -> dict[tuple[str, str], int]:
    """(file, key) -> bytes, bounded from the shards (a stored tensor is at least its boxes)."""
    sizes: dict[tuple[str, str], int] = {}
    ends: dict[tuple[str, str], list[int]] = {}
    esize: dict[tuple[str, str], int] = {}
    for t in manifest.tensors.values():
        for s in t.shards:
            k = (s.file, s.key)
            esize[k] = DTYPE_SIZES[t.dtype]
            cur = ends.setdefault(k, [0] * len(s.lengths))
            if len(cur) != len(s.lengths):  # a stored tensor mapped to logicals of other ranks
                cur = ends[k] = [max(cur + [0])]
                continue
            for i, (o, n) in enumerate(zip(s.stored_offsets, s.lengths, strict=True)):
                cur[i] = max(cur[i], o + n)
    for k, e in ends.items():
        sizes[k] = math.prod(e) * esize[k]
    return sizes
