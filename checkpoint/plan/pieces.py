"""Which boxes of which logical tensors a rank's physical tensors hold (the items of a save or a load).

A DTensor's placements say it (its local shard is one box at its global offset); a plain tensor
is one replicated box; anything else (fused, padded, flat tensors) is said by a `PieceRule`,
which the resharding rules provide (`elastickit.reshard.RuleSet.piece_rule`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..format.items import LoadItem, LogicalSpec, Piece, SaveItem
from ..format.stfile import st_dtype

#: Extra logical boxes for a tensor, decided above the format (by resharding rules). Given the
#: logical name and the local tensor, return its pieces and logical specs, or None for the
#: default (DTensor placements, or a replicated plain tensor).
PieceRule = Callable[[str, torch.Tensor], "tuple[tuple[Piece, ...], tuple[LogicalSpec, ...]] | None"]


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor (without importing torch.distributed.tensor)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "placements")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds (a DTensor's local shard, else `t`)."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def default_pieces(logical: str, t: torch.Tensor) -> tuple[tuple[Piece, ...], tuple[LogicalSpec, ...]]:
    """Pieces from DTensor placements; a plain tensor is one replicated box."""
    dtype = st_dtype(t.dtype, what=f"tensor {logical!r}")
    if is_dtensor(t):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local_shape, offset = compute_local_shape_and_global_offset(
            t.shape, t.device_mesh, t.placements  # type: ignore[attr-defined]
        )
        local = t.to_local()  # type: ignore[attr-defined]
        if tuple(local.shape) != tuple(local_shape):
            raise ValueError(
                f"tensor {logical!r}: local shard shape {list(local.shape)} differs from what its "
                f"placements imply ({list(local_shape)}); give a rule for it"
            )
        piece = Piece.whole(logical, tuple(int(o) for o in offset), tuple(local_shape))
    else:
        piece = Piece.whole(logical, (0,) * t.dim(), tuple(t.shape))
    return (piece,), (LogicalSpec(name=logical, dtype=dtype, shape=tuple(t.shape)),)


def save_items(
    tensors: Mapping[str, torch.Tensor],
    rule: PieceRule | None = None,
    memo: dict[str, tuple[torch.Tensor, SaveItem]] | None = None,
) -> list[SaveItem]:
    """SaveItems for tensors by logical name.

    `memo` (logical name -> (tensor, item)) reuses the items of the previous save for tensors
    that are the same objects: their pieces cannot have changed, and the item's local view
    shares their storage.
    """
    items = []
    for logical, t in tensors.items():
        hit = memo.get(logical) if memo is not None else None
        if hit is not None and hit[0] is t:
            items.append(hit[1])
            continue
        got = rule(logical, t) if rule is not None else None
        pieces, specs = got if got is not None else default_pieces(logical, t)
        item = SaveItem(key=logical, tensor=local_tensor(t).detach(), pieces=pieces, specs=specs)
        if memo is not None:
            memo[logical] = (t, item)
        items.append(item)
    return items


def load_items(tensors: Mapping[str, torch.Tensor], rule: PieceRule | None = None) -> list[LoadItem]:
    """LoadItems that fill tensors (by logical name) in place."""
    items = []
    for logical, t in tensors.items():
        got = rule(logical, t) if rule is not None else None
        pieces, specs = got if got is not None else default_pieces(logical, t)
        items.append(LoadItem(key=logical, tensor=local_tensor(t).detach(), pieces=pieces, specs=specs))
    return items


__all__ = ["PieceRule", "default_pieces", "is_dtensor", "load_items", "local_tensor", "save_items"]
