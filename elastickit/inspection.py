"""Plain-data summaries of checkpoints for `inspect`, `verify` and `ls` (no typer, no rich)."""

from __future__ import annotations

import os
from typing import Any

from elastickit.checkpoint.errors import ElastickitError, IncompleteCheckpointError, RequestError
from elastickit.checkpoint.events import read_events
from elastickit.checkpoint.format.directory import (
    list_checkpoints,
    load_manifest,
    resolve,
    verify_checkpoint,
)
from elastickit.checkpoint.format.manifest import MANIFEST_NAME
from elastickit.checkpoint.paths import is_url

EVENTS_NAME = "events.jsonl"
"""The event log a `Checkpointer` keeps under its root (its default `events` path)."""


FORMAT_NAMES = {
    "dcp": "PyTorch DCP",
    "deepspeed": "DeepSpeed",
    "safetensors": "Hugging Face safetensors",
}


def foreign_format(path: str) -> str | None:
    """The registered source format other than elastickit that `path` is (None if none)."""
    from elastickit.reshard.adapters.registry import detect_format

    try:
        fmt = detect_format(path)
    except RequestError:
        return None
    return None if fmt == "elastickit" else fmt


def not_elastickit(path: str, fmt: str) -> RequestError:
    """The one sentence for a checkpoint of another format where elastickit's is expected."""
    return RequestError(
        f"{path} is a {FORMAT_NAMES.get(fmt, fmt)} checkpoint, not an elastickit one; convert it "
        f"first: elastickit convert {path} DST --from {fmt}",
        path=path,
    )


def resolve_elastickit(path: str) -> str:
    """`resolve` (a step directory, or a root's newest), naming the format and the conversion
    when `path` holds another format's checkpoint (DCP, DeepSpeed, safetensors)."""
    try:
        return resolve(path)
    except (IncompleteCheckpointError, RequestError):
        fmt = foreign_format(path) if os.path.isdir(path) else None
        if fmt is not None:
            raise not_elastickit(path, fmt) from None
        raise


def inspect_checkpoint(path: str) -> dict[str, Any]:
    """A JSON-able summary of one checkpoint (a root resolves to its newest committed one)."""
    if is_url(path):
        from elastickit.remote import inspect_object

        return describe(*inspect_object(path))
    ckpt = resolve_elastickit(path)
    m = load_manifest(ckpt)
    present = {}
    for name, rec in m.files.items():
        try:
            size = os.path.getsize(os.path.join(ckpt, name))
        except FileNotFoundError:
            size = None
        present[name] = "ok" if size == rec.size_bytes else ("missing" if size is None else "size mismatch")
    return describe(ckpt, m, present)


def describe(path: str, m: Any, present: dict[str, str]) -> dict[str, Any]:
    """The inspect report of manifest `m` at `path` (a directory or a URL), with each file's
    presence as checked by the caller."""
    return {
        "path": path,
        "step": m.step,
        "format_version": f"{m.version[0]}.{m.version[1]}",
        "created_s": m.created_s,
        "world_size": m.world_size,
        "layout": {"axes": {a: n for a, n in m.layout.axes}, "zero": m.layout.zero},
        "num_rules": len(m.rules),
        "rules": list(m.rules),
        "framework": m.framework,
        "num_tensors": len(m.tensors),
        "total_bytes": m.total_bytes,
        "stored_bytes": sum(f.size_bytes for f in m.files.values()),
        "files": [
            {"name": n, "size_bytes": f.size_bytes, "rank": f.rank, "compression": f.compression, "status": present[n]}
            for n, f in sorted(m.files.items())
        ],
        "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "num_shards": len(t.shards), "bytes": t.nbytes}
            for t in sorted(m.tensors.values(), key=lambda t: t.name)
        ],
        "objects": sorted(m.objects),
        "integrity": "files present" if all(v == "ok" for v in present.values()) else "damaged (run verify)",
    }


def verify(path: str) -> dict[str, Any]:
    """Verify every checksum; returns the report (`ok` False with problems when corrupt)."""
    if is_url(path):
        from elastickit.remote import verify_object

        return verify_object(path)
    ckpt = resolve_elastickit(path)
    problems = verify_checkpoint(ckpt)
    m = load_manifest(ckpt)
    return {
        "path": ckpt,
        "step": m.step,
        "files_checked": len(m.files),
        "bytes_checked": sum(f.size_bytes for f in m.files.values()),
        "ok": not problems,
        "problems": [{"file": p.file, "tensors": list(p.tensors), "reason": p.reason} for p in problems],
    }


def list_root(root: str) -> list[dict[str, Any]]:
    """Every checkpoint under `root` with its status, oldest first.

    One row per `step-*` directory: `complete`; `incomplete` (never committed, or a file the
    manifest lists is missing); `damaged` (a file of the wrong size: run verify); `unreadable`
    (the manifest itself). Then one row per save that the root's `events.jsonl` records as
    skipped for a tier (`skipped`: superseded by a newer step while the tier was busy, or no
    host buffer was free) and that left no directory. Rows that are not `complete` carry a
    `reason`, whole.
    """
    if is_url(root):
        from elastickit.remote import list_object_root

        return list_object_root(root)
    if not os.path.exists(root):
        raise RequestError(f"{root} does not exist", path=root)
    rows = []
    for c in list_checkpoints(root):
        row: dict[str, Any] = {"step": c.step, "path": c.path, "tier": "persistent"}
        if not c.complete:
            row.update(
                status="incomplete",
                reason=f"no {MANIFEST_NAME}: the save never committed (or is still being written)",
            )
            rows.append(row)
            continue
        try:
            m = load_manifest(c.path)
        except ElastickitError as e:  # shown in the listing, not raised
            row.update(status="unreadable", reason=str(e))
            rows.append(row)
            continue
        row.update(
            status="complete",
            created_s=m.created_s,
            world_size=m.world_size,
            stored_bytes=sum(f.size_bytes for f in m.files.values()),
            num_tensors=len(m.tensors),
        )
        missing, wrong = _file_problems(c.path, m)
        if missing or wrong:
            row.update(
                status="incomplete" if missing else "damaged",
                reason="; ".join(missing + wrong) + f"; run elastickit verify {c.path}",
            )
        rows.append(row)
    have = {r["step"] for r in rows}
    rows += [r for r in _skipped(root) if r["step"] not in have]
    if not rows and os.path.isdir(root):
        fmt = foreign_format(root)
        if fmt is not None:
            raise not_elastickit(root, fmt)
    return sorted(rows, key=lambda r: (r["step"], r["tier"]))


def _file_problems(path: str, m: Any) -> tuple[list[str], list[str]]:
    """(missing files, files of the wrong size) of a committed checkpoint: a stat per file, so
    `ls` stays fast; `verify` reads every byte."""
    missing, wrong = [], []
    for name, rec in sorted(m.files.items()):
        try:
            size = os.path.getsize(os.path.join(path, name))
        except FileNotFoundError:
            missing.append(f"{name} is missing")
            continue
        if size != rec.size_bytes:
            wrong.append(f"{name} has {size} bytes but the manifest says {rec.size_bytes}")
    return missing, wrong


def _skipped(root: str) -> list[dict[str, Any]]:
    """Saves the event log records as skipped, per tier (the newest record of a step wins)."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    for e in read_events(os.path.join(root, EVENTS_NAME)):
        if e.get("type") not in ("checkpoint", "checkpoint_skipped"):
            continue
        step, skipped = e.get("step"), e.get("skipped_tiers")
        if not isinstance(step, int) or not isinstance(skipped, dict):
            continue
        for tier, why in skipped.items():
            out[(step, str(tier))] = {
                "step": step,
                "tier": str(tier),
                "status": "skipped",
                "reason": str(why),
                **({"created_s": e["time"]} if isinstance(e.get("time"), int | float) else {}),
            }
    return list(out.values())
