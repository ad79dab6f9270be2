"""The resharding language (DESIGN.md section 3): how each physical tensor relates to logical ones.

A `RuleSet` is an ordered list of `Rule`s; a rule matches physical names (the flattened state
names such as `model/layers.0.attention.wqkv.weight`, glob patterns) and carries operations:

    shard(dim, axis)             the local tensor is the axis-rank's chunk along dim
    replicate(axis, merge)       every rank of axis holds a copy; merge = first | average | check
    pad(dim, size, multiple)     the physical tensor has padding rows past `size` (vocabulary)
    fused(dim, parts)            the physical tensor concatenates several logical tensors along
                                 dim, each sharded on its own over the dim's first shard axis
    rename(src, dst, ...)        physical name -> logical name, with pipeline layer offsets
    expert(axis, ...)            local expert index on an ep rank -> global expert index
    flat(params, axis, ...)      a ZeRO-style flat, padded, dp-partitioned buffer of parameters

First match wins; a tensor no rule matches gets the default (DTensor placements, or a
replicated plain tensor). For a DTensor the placements say where the local tensor sits in the
DTensor's global tensor, so `shard` is only read to know the fused/pad axis; for a plain tensor
the `shard` operations locate it. A rule that does not fit a tensor raises `RuleError` naming
both. Rules are stored in every manifest as JSON (`to_json` / `from_json`), and load from TOML.

The mapping along the transformed dim is a list of segments: rows [g0, g0 + n) of the global
physical tensor are rows [l0, l0 + n) of a logical tensor; rows no segment covers are padding.
"""

from __future__ import annotations

import fnmatch
import math
import re
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from elastickit.checkpoint.errors import RequestError
from elastickit.checkpoint.format.items import LogicalSpec, Piece
from elastickit.checkpoint.format.manifest import LayoutRecord
from elastickit.checkpoint.format.stfile import st_dtype
from elastickit.checkpoint.plan.pieces import PieceRule, default_pieces

from .layout import AXES, axis_coords, axis_sizes

MERGES = ("first", "average", "check")


class RuleError(RequestError):
    """A rule is malformed, or does not fit the tensor it matched."""


def _check_axis(axis: str, where: str) -> None:
    if axis not in AXES:
        raise ValueError(f"{where}.axis must be one of {', '.join(AXES)}, got {axis!r}")


def _check_dim(dim: int, where: str) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
        raise ValueError(f"{where}.dim must be an integer >= 0, got {dim!r}")


# -- operations ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Shard:
    """The local tensor is chunk `coord(axis)` of `size(axis)` equal chunks along `dim`.

    Several shards on one dim nest, outermost first (e.g. tp, then a ZeRO dp split).
    """

    dim: int
    axis: str

    def __post_init__(self) -> None:
        _check_dim(self.dim, "shard")
        _check_axis(self.axis, "shard")


@dataclass(frozen=True, slots=True, kw_only=True)
class Replicate:
    """Every rank of `axis` holds the same copy; `merge` says how copies combine on read."""

    axis: str
    merge: str = "first"

    def __post_init__(self) -> None:
        _check_axis(self.axis, "replicate")
        if self.merge not in MERGES:
            raise ValueError(
                f"replicate.merge must be one of {', '.join(MERGES)}, got {self.merge!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Pad:
    """The global physical tensor has `size` logical rows along `dim`, then padding.

    The padded extent is `size` rounded up to a multiple of `multiple` (times `size(axis)` when
    `axis` is given: the vocabulary padded to 128 * tp); a tensor whose extent differs fails.
    """

    dim: int
    size: int
    multiple: int = 1
    axis: str | None = None

    def __post_init__(self) -> None:
        _check_dim(self.dim, "pad")
        if self.size < 1 or self.multiple < 1:
            raise ValueError(
                f"pad.size and pad.multiple must be >= 1, got {self.size}, {self.multiple}"
            )
        if self.axis is not None:
            _check_axis(self.axis, "pad")

    def padded(self, sizes: Mapping[str, int]) -> int:
        """The padded extent under axis sizes `sizes`."""
        unit = self.multiple * (sizes[self.axis] if self.axis else 1)
        return -(-self.size // unit) * unit


@dataclass(frozen=True, slots=True, kw_only=True)
class Fused:
    """The physical tensor concatenates logical tensors `parts` ((suffix, extent) pairs) along
    `dim`; each part is sharded on its own over the first shard axis of `dim`, so tp rank r holds
    [part0_r; part1_r; ...]. Part j's logical name is `name_format.format(name=..., part=...)`.
    """

    dim: int
    parts: tuple[tuple[str, int], ...]
    name_format: str = "{name}:{part}"

    def __post_init__(self) -> None:
        _check_dim(self.dim, "fused")
        if len(self.parts) < 2:
            raise ValueError(f"fused.parts needs at least two parts, got {list(self.parts)}")
        names = [p for p, _ in self.parts]
        if len(set(names)) != len(names) or any(n < 1 for _, n in self.parts):
            raise ValueError(
                f"fused.parts must have distinct names and sizes >= 1, got {list(self.parts)}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Rename:
    """Physical name -> logical name: the first match of regex `src` is replaced by `dst`
    (a `str.format` template of src's named groups). The group `i`, an integer, gets an offset:
    `offsets[coord(axis)]`, or `coord(axis) * stride`, or, with `num_layers`, the first layer of
    pipeline stage coord(axis) (contiguous stages, the first num_layers % pp get one more).
    """

    src: str
    dst: str
    axis: str | None = None
    num_layers: int | None = None
    stride: int | None = None
    offsets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        try:
            re.compile(self.src)
        except re.error as e:
            raise ValueError(
                f"rename.src is not a regular expression ({e}): {self.src!r}"
            ) from None
        groups = set(re.compile(self.src).groupindex)
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.dst) if f is not None}
        except ValueError as e:
            raise ValueError(f"rename.dst is not a format template ({e}): {self.dst!r}") from None
        unknown = sorted(f for f in fields if f not in groups)
        if unknown:
            raise ValueError(
                f"rename.dst {self.dst!r} uses {{{unknown[0]}}}, which is not a named group "
                f"(?P<{unknown[0]}>...) of rename.src {self.src!r}"
            )
        if self.axis is not None:
            _check_axis(self.axis, "rename")
            if sum(x is not None for x in (self.num_layers, self.stride, self.offsets)) != 1:
                raise ValueError(
                    "rename with an axis needs exactly one of num_layers, stride, offsets"
                )

    def offset(self, sizes: Mapping[str, int], coords: Mapping[str, int]) -> int:
        if self.axis is None:
            return 0
        c, n = coords[self.axis], sizes[self.axis]
        if self.offsets is not None:
            if len(self.offsets) != n:
                raise RuleError(
                    f"rename.offsets has {len(self.offsets)} entries but axis {self.axis} has size {n}"
                )
            return self.offsets[c]
        if self.stride is not None:
            return c * self.stride
        assert self.num_layers is not None
        base, extra = divmod(self.num_layers, n)
        return c * base + min(c, extra)

    def apply(self, name: str, sizes: Mapping[str, int], coords: Mapping[str, int]) -> str:
        m = re.search(self.src, name)
        if m is None:
            return name
        groups: dict[str, Any] = dict(m.groupdict())
        if groups.get("i") is not None:
            groups["i"] = int(groups["i"]) + self.offset(sizes, coords)
        return name[: m.start()] + self.dst.format(**groups) + name[m.end() :]


@dataclass(frozen=True, slots=True, kw_only=True)
class Expert:
    """Expert parallelism. Stacked experts (`num_local` None): the local tensor holds experts
    [r*E/ep, (r+1)*E/ep) along `dim` (like shard). Separate parameters (`num_local` set): the
    integer group `i` of regex `src` (default `experts.<i>`) is the local expert index, and the
    logical name carries the global index `coord(axis) * num_local + i`.
    """

    axis: str = "ep"
    dim: int = 0
    num_local: int | None = None
    src: str = r"experts\.(?P<i>\d+)"
    dst: str = "experts.{i}"

    def __post_init__(self) -> None:
        _check_axis(self.axis, "expert")
        _check_dim(self.dim, "expert")

    def as_rename(self) -> Rename:
        return Rename(src=self.src, dst=self.dst, axis=self.axis, stride=self.num_local)


@dataclass(frozen=True, slots=True, kw_only=True)
class Flat:
    """A ZeRO flat buffer: the parameters `params` ((logical name, shape) pairs, in flattening
    order) concatenated, padded to a multiple of `align * size(axis)`, and split evenly over
    `axis`; the local 1-D tensor is this rank's partition. Logical tensors are kept flat (1-D,
    numel long): a reader reshapes them.
    """

    params: tuple[tuple[str, tuple[int, ...]], ...]
    zero: int = 1
    axis: str = "dp"
    align: int = 1

    def __post_init__(self) -> None:
        _check_axis(self.axis, "flat")
        if not 1 <= self.zero <= 3:
            raise ValueError(f"flat.zero must be 1, 2 or 3, got {self.zero}")
        if not self.params:
            raise ValueError("flat.params must list the flattened parameters")


Op = Shard | Replicate | Pad | Fused | Rename | Expert | Flat


# -- constructors (the Python spelling of the language) -----------------------------------------


def shard(dim: int, axis: str) -> Shard:
    """`shard(dim, axis)`: see `Shard`."""
    return Shard(dim=dim, axis=axis)


def replicate(axis: str, merge: str = "first") -> Replicate:
    """`replicate(axis, merge)`: see `Replicate`."""
    return Replicate(axis=axis, merge=merge)


def pad(dim: int, size: int, multiple: int = 1, axis: str | None = None) -> Pad:
    """`pad(dim, size, multiple)`: see `Pad`."""
    return Pad(dim=dim, size=size, multiple=multiple, axis=axis)


def fused(
    dim: int,
    parts: Sequence[tuple[str, int]] | Mapping[str, int],
    name_format: str = "{name}:{part}",
) -> Fused:
    """`fused(dim, parts)`: see `Fused`. `parts` is an ordered mapping or (name, size) pairs."""
    items = parts.items() if isinstance(parts, Mapping) else parts
    return Fused(dim=dim, parts=tuple((str(p), int(n)) for p, n in items), name_format=name_format)


def rename(
    src: str,
    dst: str,
    *,
    axis: str | None = None,
    num_layers: int | None = None,
    stride: int | None = None,
    offsets: Sequence[int] | None = None,
) -> Rename:
    """`rename(src, dst)` with optional layer offsets: see `Rename`."""
    return Rename(
        src=src,
        dst=dst,
        axis=axis,
        num_layers=num_layers,
        stride=stride,
        offsets=tuple(offsets) if offsets is not None else None,
    )


def expert(
    axis: str = "ep",
    *,
    dim: int = 0,
    num_local: int | None = None,
    src: str = r"experts\.(?P<i>\d+)",
    dst: str = "experts.{i}",
) -> Expert:
    """`expert(axis)`: see `Expert`."""
    return Expert(axis=axis, dim=dim, num_local=num_local, src=src, dst=dst)


def flat(
    params: Sequence[tuple[str, Sequence[int]]], *, zero: int = 1, axis: str = "dp", align: int = 1
) -> Flat:
    """`flat(zero)`: see `Flat`."""
    return Flat(
        params=tuple((str(n), tuple(int(x) for x in s)) for n, s in params),
        zero=zero,
        axis=axis,
        align=align,
    )


# -- rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows [g0, g0 + length) of the global physical tensor along the rule's dim are rows
    [l0, l0 + length) of logical tensor `logical`."""

    g0: int
    length: int
    logical: str
    l0: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """Operations for the physical tensors whose names match one of `match` (glob patterns)."""

    match: tuple[str, ...]
    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        if not self.match:
            raise ValueError("rule.match needs at least one name pattern")
        transforms = [o for o in self.ops if isinstance(o, Pad | Fused)]
        if len(transforms) > 1:
            raise ValueError(
                f"rule {self.label} has {len(transforms)} pad/fused operations; at most one fits"
            )
        if any(isinstance(o, Flat) for o in self.ops) and len(self.ops) > 1:
            raise ValueError(f"rule {self.label}: flat cannot be combined with other operations")
        merges = {o.merge for o in self.ops if isinstance(o, Replicate)} - {"first"}
        if len(merges) > 1:
            raise ValueError(f"rule {self.label} asks for different merges {sorted(merges)}")

    @property
    def label(self) -> str:
        return "|".join(self.match)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.match)

    def fail(self, name: str, why: str) -> RuleError:
        return RuleError(f"rule {self.label!r} does not fit tensor {name!r}: {why}", tensor=name)

    @property
    def merge(self) -> str:
        return next(
            (o.merge for o in self.ops if isinstance(o, Replicate) and o.merge != "first"), "first"
        )

    def logical_name(self, name: str, sizes: Mapping[str, int], coords: Mapping[str, int]) -> str:
        for op in self.ops:
            if isinstance(op, Rename):
                name = op.apply(name, sizes, coords)
            elif isinstance(op, Expert) and op.num_local is not None:
                name = op.as_rename().apply(name, sizes, coords)
        return name

    def _shards(self) -> list[Shard]:
        out = []
        for op in self.ops:
            if isinstance(op, Shard):
                out.append(op)
            elif isinstance(op, Expert) and op.num_local is None:
                out.append(Shard(dim=op.dim, axis=op.axis))
        return out

    def segments(
        self, name: str, logical: str, extent: int, nblocks: int, sizes: Mapping[str, int]
    ) -> tuple[list[Segment], dict[str, int]]:
        """The segments of the transformed dim (global physical extent `extent`, `nblocks` shards
        of the fused parts) and each logical tensor's extent along it."""
        op = next((o for o in self.ops if isinstance(o, Pad | Fused)), None)
        if isinstance(op, Pad):
            if op.padded(sizes) != extent:
                raise self.fail(
                    name,
                    f"dim {op.dim} has {extent} rows but pad(size={op.size}, multiple={op.multiple}"
                    f"{', axis=' + op.axis if op.axis else ''}) pads to {op.padded(sizes)}",
                )
            return [Segment(0, op.size, logical, 0)], {logical: op.size}
        if isinstance(op, Fused):
            total = sum(n for _, n in op.parts)
            if total != extent:
                raise self.fail(
                    name, f"fused parts add up to {total} but dim {op.dim} has {extent}"
                )
            bad = [p for p, n in op.parts if n % nblocks]
            if bad:
                raise self.fail(name, f"fused parts {bad} do not split into {nblocks} equal shards")
            segs, g = [], 0
            for r in range(nblocks):
                for part, n in op.parts:
                    k = n // nblocks
                    segs.append(
                        Segment(g, k, op.name_format.format(name=logical, part=part), r * k)
                    )
                    g += k
            return segs, {op.name_format.format(name=logical, part=p): n for p, n in op.parts}
        return [Segment(0, extent, logical, 0)], {logical: extent}

    def transform_dim(self) -> int | None:
        op = next((o for o in self.ops if isinstance(o, Pad | Fused)), None)
        return op.dim if op is not None else None

    def pieces(
        self, name: str, t: torch.Tensor, sizes: Mapping[str, int], coords: Mapping[str, int]
    ) -> tuple[tuple[Piece, ...], tuple[LogicalSpec, ...]]:
        """The logical boxes physical tensor `name` (local tensor `t`) carries on this rank."""
        flat_op = next((o for o in self.ops if isinstance(o, Flat)), None)
        if flat_op is not None:
            return _flat_pieces(self, flat_op, name, t, sizes, coords)
        logical = self.logical_name(name, sizes, coords)
        dtype = st_dtype(t.dtype, what=f"tensor {name!r}")
        shards = self._shards()
        for s in shards:
            if s.dim >= t.dim():
                raise self.fail(name, f"shard.dim {s.dim} but the tensor has {t.dim()} dims")
        tdim = self.transform_dim()
        if tdim is not None and tdim >= t.dim():
            raise self.fail(name, f"dim {tdim} but the tensor has {t.dim()} dims")
        first_axis = next((s.axis for s in shards if s.dim == tdim), None)
        if type(t).__name__ == "DTensor":
            (box,), _ = default_pieces(name, t)
            gshape, offsets, lengths = tuple(t.shape), box.offsets, box.lengths
            nblocks = _mesh_size(t, first_axis, sizes)
        else:
            gshape, offsets, lengths = _plain_box(self, name, t, shards, sizes, coords)
            nblocks = sizes[first_axis] if first_axis else 1
        if tdim is None:
            spec = LogicalSpec(name=logical, dtype=dtype, shape=gshape, merge=self.merge)
            return (Piece.whole(logical, offsets, lengths),), (spec,)
        segs, extents = self.segments(name, logical, gshape[tdim], nblocks, sizes)
        lo, hi = offsets[tdim], offsets[tdim] + lengths[tdim]
        pieces = []
        for s in segs:
            a, b = max(lo, s.g0), min(hi, s.g0 + s.length)
            if a >= b:
                continue
            pieces.append(
                Piece(
                    logical=s.logical,
                    offsets=_put(offsets, tdim, s.l0 + a - s.g0),
                    lengths=_put(lengths, tdim, b - a),
                    stored_offsets=_put((0,) * len(offsets), tdim, a - lo),
                )
            )
        specs = tuple(
            LogicalSpec(name=n, dtype=dtype, shape=_put(gshape, tdim, e), merge=self.merge)
            for n, e in extents.items()
        )
        return tuple(pieces), specs


def _put(t: tuple[int, ...], i: int, v: int) -> tuple[int, ...]:
    return t[:i] + (v,) + t[i + 1 :]


def _mesh_size(t: torch.Tensor, axis: str | None, sizes: Mapping[str, int]) -> int:
    if axis is None:
        return 1
    mesh = t.device_mesh  # type: ignore[attr-defined]
    names = mesh.mesh_dim_names or ()
    if axis in names:
        return int(mesh.size(names.index(axis)))
    return sizes[axis]


def _plain_box(
    rule: Rule,
    name: str,
    t: torch.Tensor,
    shards: list[Shard],
    sizes: Mapping[str, int],
    coords: Mapping[str, int],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(global physical shape, local offsets, local lengths) of a plain local tensor."""
    gshape = list(t.shape)
    offsets = [0] * t.dim()
    for s in reversed(shards):  # innermost first: each outer shard scales what is inside it
        offsets[s.dim] += coords[s.axis] * gshape[s.dim]
        gshape[s.dim] *= sizes[s.axis]
    return tuple(gshape), tuple(offsets), tuple(t.shape)


def _flat_pieces(
    rule: Rule,
    op: Flat,
    name: str,
    t: torch.Tensor,
    sizes: Mapping[str, int],
    coords: Mapping[str, int],
) -> tuple[tuple[Piece, ...], tuple[LogicalSpec, ...]]:
    if t.dim() != 1:
        raise rule.fail(name, f"flat needs a 1-D buffer, got shape {list(t.shape)}")
    n = sizes[op.axis]
    total = sum(math.prod(s) for _, s in op.params)
    unit = op.align * n
    padded = -(-total // unit) * unit
    part = padded // n
    if t.numel() != part:
        raise rule.fail(
            name,
            f"flat expects {part} elements per {op.axis} rank ({total} parameters padded to "
            f"{padded}) but the buffer has {t.numel()}",
        )
    dtype = st_dtype(t.dtype, what=f"tensor {name!r}")
    lo = coords[op.axis] * part
    hi = lo + part
    pieces, specs, start = [], [], 0
    for pname, shape in op.params:
        numel = math.prod(shape)
        a, b = max(lo, start), min(hi, start + numel)
        if a < b:
            pieces.append(
                Piece(
                    logical=pname, offsets=(a - start,), lengths=(b - a,), stored_offsets=(a - lo,)
                )
            )
        specs.append(LogicalSpec(name=pname, dtype=dtype, shape=(numel,)))
        start += numel
    return tuple(pieces), tuple(specs)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Ordered rules; the first rule whose pattern matches a physical name applies."""

    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))

    def match(self, name: str) -> Rule | None:
        """The first rule matching `name`, or None."""
        return next((r for r in self.rules if r.matches(name)), None)

    def piece_rule(self, layout: LayoutRecord, rank: int) -> PieceRule:
        """The checkpoint's hook for rank `rank` of `layout`: pieces for matched tensors, None
        (the default) for the rest."""
        sizes = axis_sizes(layout)
        coords = axis_coords(layout, rank)

        def rule_fn(
            name: str, t: torch.Tensor
        ) -> tuple[tuple[Piece, ...], tuple[LogicalSpec, ...]] | None:
            r = self.match(name)
            return None if r is None else r.pieces(name, t, sizes, coords)

        return rule_fn

    def to_json(self) -> list[dict[str, Any]]:
        """The manifest's form: [{"match": [...], "ops": [{"op": "shard", ...}, ...]}, ...]."""
        return [{"match": list(r.match), "ops": [_op_json(o) for o in r.ops]} for r in self.rules]

    @classmethod
    def from_json(cls, data: Iterable[Mapping[str, Any]], *, source: str = "rules") -> RuleSet:
        """Parse the JSON (or TOML-table) form; ValueError naming the rule and field otherwise."""
        rules = []
        if isinstance(data, str | bytes | Mapping) or not isinstance(data, Iterable):
            raise RuleError(f"{source}: the rules must be a list of [[rule]] tables, got {data!r}")
        for i, d in enumerate(data):
            where = f"{source}: rule {i}"
            if not isinstance(d, Mapping) or "match" not in d:
                raise RuleError(f"{where} needs a 'match' pattern (or list of patterns)")
            match = d["match"]
            if isinstance(match, str):
                match = (match,)
            elif isinstance(match, list | tuple) and all(isinstance(m, str) for m in match):
                match = tuple(match)
            else:
                raise RuleError(
                    f"{where}: 'match' must be a name pattern or a list of them, got {match!r}"
                )
            if not isinstance(d.get("ops", []), list | tuple):
                raise RuleError(f"{where} ({'|'.join(match)}): 'ops' must be a list of tables")
            try:
                ops = tuple(_op_from(o, f"{where} op {j}") for j, o in enumerate(d.get("ops", [])))
                rules.append(Rule(match=match, ops=ops))
            except (ValueError, TypeError, KeyError) as e:
                raise RuleError(f"{where} ({'|'.join(match)}) is malformed: {e}") from e
        return cls(tuple(rules))


def rule(match: str | Sequence[str], *ops: Op) -> Rule:
    """A rule from a pattern (or patterns) and operations."""
    return Rule(match=(match,) if isinstance(match, str) else tuple(match), ops=tuple(ops))


_OPS: dict[str, type] = {
    "shard": Shard,
    "replicate": Replicate,
    "pad": Pad,
    "fused": Fused,
    "rename": Rename,
    "expert": Expert,
    "flat": Flat,
}
_NAMES = {v: k for k, v in _OPS.items()}


def _op_json(op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {"op": _NAMES[type(op)]}
    for f in op.__dataclass_fields__:  # type: ignore[union-attr]
        v = getattr(op, f)
        if v is None:
            continue
        if isinstance(op, Fused) and f == "parts":
            v = [[p, n] for p, n in v]
        elif isinstance(op, Flat) and f == "params":
            v = [[p, list(s)] for p, s in v]
        elif isinstance(v, tuple):
            v = list(v)
        out[f] = v
    return out


def _op_from(d: Mapping[str, Any], where: str) -> Op:
    if not isinstance(d, Mapping) or d.get("op") not in _OPS:
        raise ValueError(f"{where}: 'op' must be one of {', '.join(_OPS)}, got {d!r}")
    kind = d["op"]
    kw = {k: v for k, v in d.items() if k != "op"}
    known = set(_OPS[kind].__dataclass_fields__)
    unknown = set(kw) - known
    if unknown:
        raise ValueError(
            f"{where}: {kind} has no field(s) {sorted(unknown)} (fields: {sorted(known)})"
        )
    if kind == "fused":
        return fused(**kw)
    if kind == "flat":
        return flat(**kw)
    if kind == "rename" and kw.get("offsets") is not None:
        kw["offsets"] = tuple(kw["offsets"])
    return _OPS[kind](**kw)  # type: ignore[no-any-return]


def load_rules(path: str) -> RuleSet:
    """Read a TOML rules file: an array of tables `[[rule]]` with `match` and `ops`."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RuleError(
            f"rules file {path} does not exist; pass an existing TOML file to --rules", path=path
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise RuleError(f"rules file {path} is not valid TOML ({e})", path=path) from e
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RuleError(
            f"rules file {path} cannot be read ({why}); pass a TOML file to --rules", path=path
        ) from e
    unknown = set(data) - {"rule"}
    if unknown:
        raise RuleError(
            f"rules file {path} has unknown top-level key(s) {sorted(unknown)}; use [[rule]] tables",
            path=path,
        )
    return RuleSet.from_json(data.get("rule", []), source=path)

