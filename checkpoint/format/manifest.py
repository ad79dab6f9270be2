"""The manifest: the typed, versioned, self-describing index of one checkpoint (DESIGN.md section 2).

A checkpoint directory `<root>/step-<8 digits>/` holds one `rank-<5 digits>.safetensors` per rank
that owned data and `manifest.json`, written last by atomic rename. The manifest says, for every
logical tensor, its dtype, global shape and the shards that cover it: which stored tensor (file,
key) holds which box of the logical tensor. A stored tensor may hold several boxes (a fused QKV
holds its q, k and v parts) and need not be covered completely (vocabulary padding), so a shard
carries offsets both in the logical tensor and in the stored tensor.

Everything here is plain data: no torch, no pickle.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..errors import DataError, UnsupportedFormatError

FORMAT_NAME = "elastickit"
# 1.1: non-tensor values JSON cannot hold (tuples, bytes, BytesIO) are tagged objects in
# `objects` (see values.py); a 1.0 checkpoint has none of them and reads the same.
FORMAT_VERSION = (1, 1)
MANIFEST_NAME = "manifest.json"
STEP_DIR_RE = re.compile(r"^step-(\d{8})$")
_CHECKSUM_SEP = ',"manifest_checksum":"'

#: dtypes the format stores, by their safetensors names (the names used in the manifest too).
DTYPES = (
    "F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2",
    "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
)
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

JSONValue = Any  # what json.loads returns: the non-tensor state is user data, checked on write


def step_dir_name(step: int) -> str:
    """`step-00000042` for step 42."""
    if step < 0 or step > 99_999_999:
        raise ValueError(f"step must be in [0, 99999999], got {step}")
    return f"step-{step:08d}"


def rank_file_name(rank: int, compressed: bool = False) -> str:
    """`rank-00003.safetensors` (`.safetensors.zst` when compressed)."""
    return f"rank-{rank:05d}.safetensors" + (".zst" if compressed else "")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{what} must be a list of integers, got {value!r}")
    return tuple(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardRef:
    """One box of a logical tensor, stored in (file, key).

    Attributes:
        file: the file name inside the checkpoint directory.
        key: the stored (physical) tensor's key in that file.
        offsets: where the box starts in the logical tensor, per dim.
        lengths: the box's extent per dim.
        stored_offsets: where the box starts in the stored tensor, per dim (all zero when the stored
            tensor is exactly the box).
        replica: 0 for the copy that loading uses; 1, 2, ... for further copies of the same box,
            kept only when a rule asks for merge=average or merge=check.
    """

    file: str
    key: str
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    stored_offsets: tuple[int, ...]
    replica: int = 0

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.lengths) or len(self.stored_offsets) != len(self.lengths):
            raise ValueError(
                f"shard {self.file}:{self.key} has offsets, lengths and stored_offsets of "
                f"different ranks ({len(self.offsets)}, {len(self.lengths)}, "
                f"{len(self.stored_offsets)})"
            )
        if any(v < 0 for v in self.offsets + self.lengths + self.stored_offsets):
            raise ValueError(f"shard {self.file}:{self.key} has a negative offset or length")

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": self.file,
            "key": self.key,
            "offsets": list(self.offsets),
            "lengths": list(self.lengths),
        }
        if any(self.stored_offsets):
            out["stored_offsets"] = list(self.stored_offsets)
        if self.replica:
            out["replica"] = self.replica
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardRef:
        lengths = _ints(d["lengths"], "shard.lengths")
        return cls(
            file=str(d["file"]),
            key=str(d["key"]),
            offsets=_ints(d["offsets"], "shard.offsets"),
            lengths=lengths,
            stored_offsets=_ints(d.get("stored_offsets", [0] * len(lengths)), "shard.stored_offsets"),
            replica=int(d.get("replica", 0)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorEntry:
    """A logical tensor: dtype, global shape and the shards that cover it.

    Attributes:
        name: the logical name, e.g. `model/layers.3.attn.wqkv.weight`.
        dtype: a safetensors dtype name (`F32`, `BF16`, ...).
        shape: the global (logical) shape.
        shards: the boxes that cover it; replica 0 boxes are disjoint.
        merge: how replicas combine on read: `first`, `average` or `check`.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shards: tuple[ShardRef, ...]
    merge: str = "first"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"tensor {self.name!r} has unknown dtype {self.dtype!r}")
        if self.merge not in ("first", "average", "check"):
            raise ValueError(f"tensor {self.name!r} has unknown merge {self.merge!r}")
        for s in self.shards:
            if len(s.offsets) != len(self.shape):
                raise ValueError(
                    f"tensor {self.name!r} has rank {len(self.shape)} but shard "
                    f"{s.file}:{s.key} has rank {len(s.offsets)}"
                )
            for o, n, g in zip(s.offsets, s.lengths, self.shape, strict=True):
                if o + n > g:
                    raise ValueError(
                        f"tensor {self.name!r}: shard {s.file}:{s.key} reaches past the global "
                        f"shape {list(self.shape)}"
                    )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "shards": [s.to_json() for s in self.shards],
        }
        if self.merge != "first":
            out["merge"] = self.merge
        return out

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> TensorEntry:
        return cls(
            name=name,
            dtype=str(d["dtype"]),
            shape=_ints(d["shape"], f"tensors[{name!r}].shape"),
            shards=tuple(ShardRef.from_json(s) for s in d["shards"]),
            merge=str(d.get("merge", "first")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FileRecord:
    """One data file of the checkpoint and the checksums that protect every byte of it.

    A safetensors file is an 8-byte header length, a JSON header and the tensors' bytes back to
    back; `header_checksum` covers the first two and `tensor_checksums` each tensor's bytes, so
    one hashing pass at write time protects the whole file and a reader can verify exactly the
    tensors it reads.

    Attributes:
        name: file name inside the checkpoint directory.
        size_bytes: size of the file as stored (compressed size when compressed).
        header_checksum: xxh3-64 (hex) of the 8-byte length and the JSON header.
        tensor_checksums: key -> xxh3-64 (hex) of that tensor's bytes.
        compression: `none` or `zstd` (then checksums are of the uncompressed bytes and
            `stored_checksum` is the xxh3-64 of the compressed file).
        stored_checksum: xxh3-64 of the whole stored file, for compressed files only.
        rank: the rank that wrote it.
    """

    name: str
    size_bytes: int
    header_checksum: str
    tensor_checksums: dict[str, str]
    compression: str = "none"
    stored_checksum: str = ""
    rank: int = 0

    def __post_init__(self) -> None:
        if self.compression not in ("none", "zstd"):
            raise ValueError(f"file {self.name!r} has unknown compression {self.compression!r}")
        if self.compression == "zstd" and not self.stored_checksum:
            raise ValueError(f"compressed file {self.name!r} needs a stored_checksum")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size_bytes": self.size_bytes,
            "header_checksum": self.header_checksum,
            "tensor_checksums": dict(sorted(self.tensor_checksums.items())),
            "rank": self.rank,
        }
        if self.compression != "none":
            out["compression"] = self.compression
            out["stored_checksum"] = self.stored_checksum
        return out

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> FileRecord:
        return cls(
            name=name,
            size_bytes=int(d["size_bytes"]),
            header_checksum=str(d["header_checksum"]),
            tensor_checksums={str(k): str(v) for k, v in d["tensor_checksums"].items()},
            compression=str(d.get("compression", "none")),
            stored_checksum=str(d.get("stored_checksum", "")),
            rank=int(d.get("rank", 0)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LayoutRecord:
    """The parallel layout that wrote the checkpoint, as plain data.

    `elastickit.reshard.layout.ParallelLayout` converts to and from it; the format itself only
    needs the mesh axes (outermost first) and the ZeRO stage.

    Attributes:
        axes: (axis name, size) pairs, outermost first, e.g. (("pp", 1), ("dp", 2), ("tp", 2)).
        zero: the ZeRO stage (0 when not applicable).
    """

    axes: tuple[tuple[str, int], ...] = ()
    zero: int = 0

    @property
    def world_size(self) -> int:
        return math.prod(size for _, size in self.axes) if self.axes else 1

    def to_json(self) -> dict[str, Any]:
        return {"axes": [[a, n] for a, n in self.axes], "zero": self.zero}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayoutRecord:
        axes = tuple((str(a), int(n)) for a, n in d.get("axes", []))
        for a, n in axes:
            if n < 1:
                raise ValueError(f"layout axis {a!r} has size {n}; sizes must be >= 1")
        return cls(axes=axes, zero=int(d.get("zero", 0)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """The index of one committed checkpoint.

    Attributes:
        step: the training step the checkpoint holds.
        created_s: wall time (Unix seconds) of the commit.
        world_size: how many ranks saved it.
        layout: the source parallel layout.
        rules: the resharding rules in force (DESIGN.md section 3), as their JSON form.
        tensors: logical name -> TensorEntry.
        files: file name -> FileRecord.
        objects: non-tensor state shared by all ranks (rank 0's copy), JSON; tensors inside it
            appear as {"__tensor__": logical name}.
        rank_objects: per-rank non-tensor state (RNG states), index = rank.
        framework: what wrote it (torch version, elastickit version, ...).
        version: (major, minor) of the format.
    """

    step: int
    created_s: float
    world_size: int
    layout: LayoutRecord
    tensors: dict[str, TensorEntry]
    files: dict[str, FileRecord]
    rules: tuple[dict[str, Any], ...] = ()
    objects: dict[str, JSONValue] = field(default_factory=dict)
    rank_objects: tuple[dict[str, JSONValue], ...] = ()
    framework: dict[str, str] = field(default_factory=dict)
    version: tuple[int, int] = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.step < 0:
            raise ValueError(f"manifest step must be >= 0, got {self.step}")
        if self.world_size < 1:
            raise ValueError(f"manifest world_size must be >= 1, got {self.world_size}")
        for t in self.tensors.values():
            for s in t.shards:
                rec = self.files.get(s.file)
                if rec is None:
                    raise ValueError(f"tensor {t.name!r} names file {s.file!r}, absent from files")
                if s.key not in rec.tensor_checksums:
                    raise ValueError(
                        f"tensor {t.name!r} names key {s.key!r}, which file {s.file!r} lacks"
                    )

    @property
    def total_bytes(self) -> int:
        """Bytes of all logical tensors (what a consolidated copy would hold)."""
        return sum(t.nbytes for t in self.tensors.values())

    def tensors_in_file(self, file: str) -> list[str]:
        """Logical tensors that have at least one shard in `file`, sorted."""
        return sorted(t.name for t in self.tensors.values() if any(s.file == file for s in t.shards))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": f"{self.version[0]}.{self.version[1]}",
            "step": self.step,
            "created_s": self.created_s,
            "world_size": self.world_size,
            "framework": dict(self.framework),
            "layout": self.layout.to_json(),
            "rules": list(self.rules),
            "objects": self.objects,
            "rank_objects": list(self.rank_objects),
            "files": {n: f.to_json() for n, f in sorted(self.files.items())},
            "tensors": {n: t.to_json() for n, t in sorted(self.tensors.items())},
        }

    def dumps(self) -> str:
        """The manifest file's text: JSON whose last field checksums every byte before it.

        A flipped byte anywhere in the file then fails either the JSON parse or the checksum.
        """
        # Compact: the C encoder is ten times faster than the indenting one, and
        # `elastickit inspect --json` is the human view.
        body = json.dumps(self.to_json(), separators=(",", ":"), allow_nan=True)
        head = body[:-1]
        return f'{head}{_CHECKSUM_SEP}{xxhash.xxh3_64_hexdigest(head.encode())}"}}\n'

    @classmethod
    def from_json(cls, d: dict[str, Any], *, source: str = "manifest.json") -> Manifest:
        """Parse and validate; refuse a foreign format or an unknown major version."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            what = f"format={d.get('format')!r}" if isinstance(d, dict) else f"a JSON {type(d).__name__}"
            raise UnsupportedFormatError(
                f"{source} is not an elastickit manifest ({what}); "
                "use `elastickit convert --from auto` for foreign checkpoints",
                path=source,
            )
        try:
            major, minor = (int(x) for x in str(d["version"]).split("."))
        except (KeyError, ValueError) as e:
            raise DataError(f"{source} has no readable format version", path=source) from e
        if major != FORMAT_VERSION[0]:
            raise UnsupportedFormatError(
                f"{source} is format version {major}.{minor} but this elastickit reads "
                f"{FORMAT_VERSION[0]}.x; upgrade elastickit to read it",
                path=source,
            )
        try:
            return cls(
                step=int(d["step"]),
                created_s=float(d["created_s"]),
                world_size=int(d["world_size"]),
                layout=LayoutRecord.from_json(d.get("layout", {})),
                rules=tuple(d.get("rules", [])),
                objects=dict(d.get("objects", {})),
                rank_objects=tuple(d.get("rank_objects", [])),
                framework={str(k): str(v) for k, v in d.get("framework", {}).items()},
                files={n: FileRecord.from_json(n, f) for n, f in d["files"].items()},
                tensors={n: TensorEntry.from_json(n, t) for n, t in d["tensors"].items()},
                version=(major, minor),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            # A field of the wrong JSON type (null, a list for an object, an infinite number).
            raise DataError(f"{source} is malformed: {e}; the checkpoint cannot be read", path=source) from e

    @classmethod
    def loads(cls, text: str, *, source: str = "manifest.json") -> Manifest:
        """Parse a manifest file's text, verifying its own checksum."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{source} is not valid JSON ({e}); it is corrupt, restore an earlier checkpoint", path=source
            ) from e
        if isinstance(d, dict) and d.get("format") == FORMAT_NAME:
            cut = text.rfind(_CHECKSUM_SEP)
            want = d.pop("manifest_checksum", None)
            if cut < 0 or want is None or xxhash.xxh3_64_hexdigest(text[:cut].encode()) != want:
                raise DataError(
                    f"{source} does not match its own checksum; it is corrupt, restore an earlier checkpoint",
                    path=source,
                )
        return cls.from_json(d, source=source)
