"""The `flat(zero)` rule of DESIGN.md section 3 for DeepSpeed ZeRO: pure functions from
parameter shapes to the fragments of each rank's flat buffers (no files, no torch).

- ZeRO-1/2 (`zero12_layout`): a group's parameters lie end to end, each followed by its
  alignment padding; the group is cut into `world` partitions of `partition_size` elements and
  rank r holds `[r * partition_size, (r + 1) * partition_size)`. A parameter may span ranks.
- ZeRO-3 (`zero3_layout`): each parameter is cut on its own into `ceil(numel / world)` pieces
  (the last padded); rank r's buffer of a sub-group is its piece of every parameter, in order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KINDS: tuple[str, ...] = ("trainable", "frozen", "buffer", "tied", "weight")


@dataclass(frozen=True, slots=True, kw_only=True)
class FlatFragment:
    """One instance of the `flat(zero)` rule.

    Elements `[src_offset, src_offset + numel)` of rank `rank`'s flat buffer of optimizer group
    `group` are elements `[dst_offset, dst_offset + numel)` of the flattened parameter.
    `group == -1` means the rank's frozen-parameter fragment (ZeRO-3), not an optimizer buffer.
    """

    rank: int
    group: int
    src_offset: int
    dst_offset: int
    numel: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DeepSpeedParam:
    """One logical tensor of a DeepSpeed checkpoint.

    Attributes:
        name: the module's state-dict name.
        shape: the global shape.
        kind: "trainable" (owned by the optimizer: fp32 master + moments), "frozen"
            (requires_grad False: weights only), "buffer" (persistent buffer), or "tied"
            (the same tensor as `tied_to`, saved once), or "weight" (ZeRO-0: a module weight;
            DeepSpeed records neither which ones train nor which optimizer index is which, so
            only the weights are read).
        group: the optimizer group (ZeRO-3: sub-group) of a trainable parameter.
        fragments: where its elements live (trainable; ZeRO-3 frozen).
        tied_to: for kind "tied", the name that holds the data.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    group: int | None = None
    fragments: tuple[FlatFragment, ...] = ()
    tied_to: str | None = None

    @property
    def numel(self) -> int:
        """Number of elements of the global tensor."""
        return math.prod(self.shape)


def zero12_layout(shapes: Sequence[Mapping[str, tuple[int, ...]]], partition_sizes: Sequence[int],
                  world: int, alignment_paddings: Sequence[Sequence[int]] | None = None,
                  ) -> dict[str, DeepSpeedParam]:
    """Trainable parameters of a ZeRO-1/2 checkpoint and where their elements live.

    Args:
        shapes: per group, name -> shape in flattening order (DeepSpeed's `param_shapes`).
        partition_sizes: per group, the elements each rank holds (padding included).
        world: the data-parallel world size.
        alignment_paddings: per group, the padding after each parameter (None: none).

    Raises:
        ValueError: a parameter runs past the last partition of its group (names it).
    """
    out: dict[str, DeepSpeedParam] = {}
    for g, group_shapes in enumerate(shapes):
        part = partition_sizes[g]
        pads = list(alignment_paddings[g]) if alignment_paddings is not None else [0] * len(group_shapes)
        if len(pads) != len(group_shapes):
            raise ValueError(f"group {g} lists {len(group_shapes)} parameters but {len(pads)} paddings")
        offset = 0
        for (name, shape), pad in zip(group_shapes.items(), pads, strict=True):
            numel = math.prod(shape)
            start, end = offset, offset + numel
            frags = []
            for r in range(start // part if part else 0, world):
                lo, hi = max(start, r * part), min(end, (r + 1) * part)
                if lo >= hi:
                    break
                frags.append(FlatFragment(rank=r, group=g, src_offset=lo - r * part,
                                          dst_offset=lo - start, numel=hi - lo))
            if sum(f.numel for f in frags) != numel:
                raise ValueError(f"parameter {name} runs past the flat buffers of group {g}")
            out[name] = DeepSpeedParam(name=name, shape=tuple(shape), kind="trainable", group=g,
                                       fragments=tuple(frags))
            offset = end + pad
    return out


def zero3_partition(name: str, shape: tuple[int, ...], world: int, *, group: int, kind: str,
                    offset: int = 0) -> DeepSpeedParam:
    """One parameter cut alone into `ceil(numel / world)` pieces at `offset` of each rank's buffer."""
    numel = math.prod(shape)
    part = math.ceil(numel / world)
    frags = tuple(FlatFragment(rank=r, group=group, src_offset=offset, dst_offset=r * part,
                               numel=min(part, numel - r * part))
                  for r in range(world) if numel - r * part > 0)
    return DeepSpeedParam(name=name, shape=tuple(shape), kind=kind,
                          group=group if group >= 0 else None, fragments=frags)


def zero3_layout(shapes: Sequence[Mapping[str, tuple[int, ...]]], world: int,
                 ) -> tuple[dict[str, DeepSpeedParam], list[int]]:
    """Trainable parameters of a ZeRO-3 checkpoint, and each sub-group's buffer size per rank."""
    out: dict[str, DeepSpeedParam] = {}
    sizes = []
    for g, group_shapes in enumerate(shapes):
        offset = 0
        for name, shape in group_shapes.items():
            out[name] = zero3_partition(name, shape, world, group=g, kind="trainable", offset=offset)
            offset += math.ceil(math.prod(shape) / world)
        sizes.append(offset)
    return out, sizes
