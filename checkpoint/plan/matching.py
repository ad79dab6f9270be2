"""Does a checkpoint fit the state it is restored into? Names, shapes and dtype kinds.

Restore is strict by default (STYLE.md 6): a checkpoint tensor that no rank of the target
loads (restoring into a smaller model), or a target tensor the checkpoint lacks, is an error
naming both sides; `strict=False` loads what matches and reports what it skipped. A tensor whose
global shape or dtype kind differs is always an error. None of these is corruption: an older
checkpoint of the same run would not fit either, so they raise `MismatchError` and restore does
not fall back.

Which checkpoint tensors are unused is a question about all ranks together (a pipeline stage
loads only its own layers): each rank marks what it loads in a bitmap over the checkpoint's
sorted tensor names, the bitmaps are ORed, and what no rank marked is unused. Everything here
is plain data: no torch, no process group.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import MismatchError
from ..format.items import LogicalSpec
from ..format.manifest import Manifest

#: how many names a message lists before "and N more"
SHOWN = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreReport:
    """What a restore loaded, and what it left out (only with `strict=False`).

    Attributes:
        step: the checkpoint's step.
        tier: the tier it came from (memory, local, persistent).
        path: its directory ("memory" for the memory tier).
        unused: checkpoint tensors no rank of the state loaded, sorted.
        missing: tensors of the state the checkpoint lacks (kept as they were), sorted.
        bytes: bytes this rank read (stored tensors touched, or its snapshot).
        fetched: files this rank received from a peer (the local tier: a buddy node's copies).
    """

    step: int
    tier: str
    path: str
    unused: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    bytes: int = 0
    fetched: tuple[str, ...] = ()


def _kind(dtype: str) -> str:
    return "float" if dtype.startswith(("F", "BF")) else "bool" if dtype == "BOOL" else "integer"


def check_specs(manifest: Manifest, specs: Iterable[LogicalSpec], where: str) -> list[str]:
    """Raise MismatchError for a tensor whose global shape or dtype kind differs between the
    checkpoint and the target; return the target's tensors the checkpoint lacks, sorted.

    A dtype of the same kind is cast on load (a float32 checkpoint into a bfloat16 model)."""
    saved = {n: (e.dtype, tuple(e.shape)) for n, e in manifest.tensors.items()}
    return compare_specs(saved, specs, where)


def compare_specs(saved: Mapping[str, tuple[str, tuple[int, ...]]], specs: Iterable[LogicalSpec], where: str) -> list[str]:
    """`check_specs` against `saved`: logical name -> (dtype, global shape)."""
    missing = set()
    for spec in specs:
        have = saved.get(spec.name)
        if have is None:
            missing.add(spec.name)
            continue
        dtype, shape = have
        if tuple(shape) != tuple(spec.shape) or _kind(dtype) != _kind(spec.dtype):
            # The planner's wording for the same misfit (reshard/planner.py), with global shapes.
            raise MismatchError(
                f"the model's tensor {spec.name!r} has shape {list(spec.shape)} ({spec.dtype}), but in "
                f"{where} it has shape {list(shape)} ({dtype}): they are different models (size or "
                "config); restore into the model that saved the checkpoint, or check the model's "
                "config and the rules",
                tensor=spec.name,
            )
    return sorted(missing)


def restored_names(manifest: Manifest, state_names: Iterable[str]) -> list[str]:
    """The checkpoint's tensors under the restored state names (`model/...` for "model"), sorted:
    the ones some rank must load."""
    wanted = set(state_names)
    return sorted(n for n in manifest.tensors if n.split("/", 1)[0] in wanted)


def used_bitmap(names: Sequence[str], used: set[str]) -> str:
    """Which of `names` this rank loads, as base64 of a little-endian bitmap."""
    bits = bytearray((len(names) + 7) // 8)
    for i, name in enumerate(names):
        if name in used:
            bits[i >> 3] |= 1 << (i & 7)
    return base64.b64encode(bytes(bits)).decode()


def unused_names(names: Sequence[str], bitmaps: Iterable[str]) -> list[str]:
    """The names no rank marked in its bitmap."""
    acc = bytearray((len(names) + 7) // 8)
    for b in bitmaps:
        for i, byte in enumerate(base64.b64decode(b)):
            acc[i] |= byte
    return [n for i, n in enumerate(names) if not acc[i >> 3] >> (i & 7) & 1]


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def describe_gap(unused: Sequence[str], missing: Sequence[str]) -> str:
    """'12 checkpoint tensor(s) are not in the state (a, b, c and 9 more), and 1 tensor(s) of the
    state are not in the checkpoint (d)': both sides of a mismatch, counts and first names."""
    parts = []
    if unused:
        parts.append(f"{len(unused)} checkpoint tensor(s) are not in the state ({_some(unused)})")
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the state are not in the checkpoint ({_some(missing)})")
    return ", and ".join(parts)


def check_fit(unused: Sequence[str], missing: Sequence[str], *, what: str, strict: bool) -> None:
    """Raise MismatchError when a strict restore of `what` would skip tensors."""
    if strict and (unused or missing):
        raise MismatchError(
            f"{what} does not fit the state restored into it: {describe_gap(unused, missing)}; "
            "restore into the model that was saved, or pass strict=False to load what matches"
        )


def merge_missing(per_rank: Iterable[Sequence[str]]) -> list[str]:
    """The union of every rank's missing tensors, sorted."""
    out: set[str] = set()
    for names in per_rank:
        out.update(names)
    return sorted(out)


def memory_gap(saved: Mapping[str, object], target: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """(unused, missing) between this rank's in-memory snapshot and its state, by name."""
    return sorted(set(saved) - set(target)), sorted(set(target) - set(saved))
