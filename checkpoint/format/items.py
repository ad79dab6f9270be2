"""What a rank saves and loads, in the format's terms: physical tensors and the boxes of logical
tensors they hold.

A `Piece` says "this box of the physical tensor is that box of a logical tensor". A DTensor shard
is one piece covering the whole local tensor; a fused QKV shard is three pieces; a padded
embedding shard is one piece that leaves the padding rows out. The resharding rules
(`elastickit.reshard`) produce pieces; the writer and the planner only see pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class Piece:
    """A box of a physical tensor that equals a box of a logical tensor.

    Attributes:
        logical: the logical tensor's name.
        offsets: where the box starts in the logical tensor.
        lengths: the box's extent (the same in both tensors).
        stored_offsets: where the box starts in the physical tensor.
    """

    logical: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    stored_offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.offsets) == len(self.lengths) == len(self.stored_offsets)):
            raise ValueError(f"piece of {self.logical!r} has offsets/lengths of different ranks")

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    @classmethod
    def whole(cls, logical: str, offsets: tuple[int, ...], lengths: tuple[int, ...]) -> Piece:
        """A physical tensor that is exactly one box of the logical tensor."""
        return cls(logical=logical, offsets=offsets, lengths=lengths, stored_offsets=(0,) * len(lengths))


@dataclass(frozen=True, slots=True, kw_only=True)
class LogicalSpec:
    """A logical tensor's identity: name, safetensors dtype name, global shape, replica merge."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    merge: str = "first"


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveItem:
    """A physical tensor this rank holds and the logical boxes it carries.

    Attributes:
        key: the physical name, unique on this rank (the key in the rank's file).
        tensor: the local tensor (any device; copied to host before writing).
        pieces: the boxes it carries.
        specs: the logical tensors the pieces refer to.
    """

    key: str
    tensor: torch.Tensor
    pieces: tuple[Piece, ...]
    specs: tuple[LogicalSpec, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadItem:
    """A physical tensor to fill on this rank and the logical boxes it needs.

    Regions of `tensor` that no piece covers (padding) are left as they are.

    Attributes:
        key: the physical name (for messages).
        tensor: the destination, written in place.
        pieces: the boxes to read.
        specs: the logical tensors the pieces belong to, as the target sees them (global shape,
            dtype), to check against the checkpoint before anything is read.
    """

    key: str
    tensor: torch.Tensor
    pieces: tuple[Piece, ...]
    specs: tuple[LogicalSpec, ...] = ()
