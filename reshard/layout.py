"""ParallelLayout: the degrees of a job's parallel axes and how ranks map to mesh coordinates.

    layout = ParallelLayout.parse("tp=2,pp=2,dp=2")       # world size 8
    layout.coords(5)        # {"pp": 1, "dp": 0, "cp": 0, "ep": 0, "tp": 1}
    layout.rank_of(pp=1, tp=1)                              # 5
    str(layout)             # "pp=2,dp=2,tp=2"

Ranks are laid out row-major over `order` (outermost first, the last axis innermost), the way a
`DeviceMesh` of shape (pp, dp, tp) numbers its ranks. The checkpoint format stores a layout as a
plain `LayoutRecord`; `to_record` / `from_record` convert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elastickit.checkpoint.format.manifest import LayoutRecord

AXES = ("pp", "dp", "ep", "cp", "tp")
"""The axes a layout knows, in the default order (outermost first, tp innermost)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParallelLayout:
    """Degrees of the parallel axes, the ZeRO stage and the rank order.

    Attributes:
        dp: data-parallel degree (replicas, or FSDP/ZeRO shards).
        tp: tensor-parallel degree.
        pp: pipeline-parallel stages.
        cp: context-parallel degree.
        ep: expert-parallel degree.
        zero: ZeRO stage, 0 (none) to 3.
        order: the axes outermost first; ranks are numbered row-major over it.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0
    order: tuple[str, ...] = AXES

    def __post_init__(self) -> None:
        for axis in AXES:
            n = getattr(self, axis)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"ParallelLayout.{axis} must be an integer >= 1, got {n!r}")
        if not isinstance(self.zero, int) or isinstance(self.zero, bool) or not 0 <= self.zero <= 3:
            raise ValueError(f"ParallelLayout.zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if sorted(self.order) != sorted(AXES):
            raise ValueError(
                f"ParallelLayout.order must name each of {', '.join(AXES)} exactly once, got {list(self.order)}"
            )

    # -- sizes and coordinates ----------------------------------------------------------

    @property
    def world_size(self) -> int:
        """The product of all axis degrees."""
        return math.prod(self.size(a) for a in AXES)

    def size(self, axis: str) -> int:
        """The degree of `axis` (ValueError for an unknown axis)."""
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; axes are {', '.join(AXES)}")
        return int(getattr(self, axis))

    def coords(self, rank: int) -> dict[str, int]:
        """The mesh coordinates of `rank`: axis -> index along that axis."""
        if not 0 <= rank < self.world_size:
            raise ValueError(
                f"rank {rank} is outside this layout's world of {self.world_size} ranks ({self})"
            )
        out: dict[str, int] = {}
        rest = rank
        for axis in reversed(self.order):
            n = self.size(axis)
            out[axis] = rest % n
            rest //= n
        return {a: out[a] for a in self.order}

    def rank_of(self, **coords: int) -> int:
        """The rank at the given coordinates (missing axes are 0)."""
        for axis, i in coords.items():
            if axis not in AXES:
                raise ValueError(f"unknown axis {axis!r}; axes are {', '.join(AXES)}")
            if not 0 <= i < self.size(axis):
                raise ValueError(f"coordinate {axis}={i} is outside 0..{self.size(axis) - 1}")
        rank = 0
        for axis in self.order:
            rank = rank * self.size(axis) + coords.get(axis, 0)
        return rank

    def group(self, rank: int, axis: str) -> list[int]:
        """The ranks that share every coordinate of `rank` except `axis` (its `axis` group)."""
        c = self.coords(rank)
        return [self.rank_of(**{**c, axis: i}) for i in range(self.size(axis))]

    # -- text -------------------------------------------------------------------------------

    def __str__(self) -> str:
        parts = [f"{a}={self.size(a)}" for a in self.order if self.size(a) > 1]
        if self.zero:
            parts.append(f"zero={self.zero}")
        return ",".join(parts) if parts else "dp=1"

    @classmethod
    def parse(cls, text: str) -> ParallelLayout:
        """Parse `tp=2,pp=2,dp=2[,zero=1]` (missing axes are 1).

        An optional `order=pp.dp.tp` names the rank order (outermost first); axes it leaves out
        keep their default relative order, outside the named ones. Raises ValueError naming the
        offending part.
        """
        values: dict[str, int] = {}
        order: tuple[str, ...] | None = None
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, val = part.partition("=")
            key = key.strip()
            if not sep:
                raise ValueError(
                    f"layout part {part!r} must look like axis=N (e.g. tp=2) in {text!r}"
                )
            if key == "order":
                names = tuple(v for v in val.strip().split(".") if v)
                unknown = [n for n in names if n not in AXES]
                if unknown or len(set(names)) != len(names):
                    raise ValueError(
                        f"layout order {val!r} must name distinct axes among {', '.join(AXES)}"
                    )
                order = tuple(a for a in AXES if a not in names) + names
                continue
            if key not in AXES and key != "zero":
                raise ValueError(
                    f"unknown layout axis {key!r} in {text!r}; use {', '.join(AXES)} or zero"
                )
            if key in values:
                raise ValueError(f"layout axis {key!r} is given twice in {text!r}")
            try:
                values[key] = int(val)
            except ValueError:
                raise ValueError(f"layout axis {key!r} needs an integer, got {val!r}") from None
            # Checked here (not only in __post_init__) so the message names the text given.
            if key == "zero" and not 0 <= values[key] <= 3:
                raise ValueError(f"zero must be 0, 1, 2 or 3, got {values[key]} in {text!r}")
            if key != "zero" and values[key] < 1:
                raise ValueError(
                    f"layout axis {key!r} must be at least 1, got {values[key]} in {text!r}"
                )
        if not values and order is None:
            raise ValueError(f"layout {text!r} names no axis; give one such as tp=2 or dp=4")
        return cls(**values, **({"order": order} if order else {}))

    # -- the format's record --------------------------------------------------------------

    def to_record(self) -> LayoutRecord:
        """The manifest's plain record: every axis with its size, outermost first."""
        return LayoutRecord(axes=tuple((a, self.size(a)) for a in self.order), zero=self.zero)

    @classmethod
    def from_record(cls, record: LayoutRecord) -> ParallelLayout:
        """Back from a record. A record with one `world` axis (no layout given) is pure dp."""
        sizes: dict[str, int] = {}
        names: list[str] = []
        for axis, n in record.axes:
            if axis == "world":
                axis = "dp"
            if axis not in AXES:
                raise ValueError(
                    f"layout record names unknown axis {axis!r}; axes are {', '.join(AXES)}"
                )
            sizes[axis] = sizes.get(axis, 1) * n
            if axis not in names:
                names.append(axis)
        order = tuple(a for a in AXES if a not in names) + tuple(names)
        return cls(**sizes, zero=record.zero, order=order)


def axis_sizes(record: LayoutRecord) -> dict[str, int]:
    """Axis -> size from a record (a `world` axis counts as dp); absent axes are 1."""
    out = dict.fromkeys(AXES, 1)
    for axis, n in record.axes:
        key = "dp" if axis == "world" else axis
        out[key] = out.get(key, 1) * n
    return out


def axis_coords(record: LayoutRecord, rank: int) -> dict[str, int]:
    """Axis -> coordinate of `rank` in a record's mesh (row-major over its axes, last innermost)."""
    out: dict[str, int] = {}
    rest = rank
    for axis, n in reversed(record.axes):
        key = "dp" if axis == "world" else axis
        out[key] = rest % n
        rest //= n
    for axis in AXES:
        out.setdefault(axis, 0)
    return out
