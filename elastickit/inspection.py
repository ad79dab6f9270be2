"""Plain-data summaries of checkpoints for `inspect`, `verify` and `ls` (no typer, no rich)."""

from __future__ import annotations

import os
from typing import Any

from elastickit.checkpoint.catalog import (
    list_checkpoints,
    load_manifest,
    resolve,
    verify_checkpoint,
)
from elastickit.checkpoint.errors import ElastickitError, RequestError
from elastickit.checkpoint.manifest import MANIFEST_NAME


def inspect_checkpoint(path: str) -> dict[str, Any]:
    """A JSON-able summary of one checkpoint (a root resolves to its newest committed one)."""
    ckpt = resolve(path)
    m = load_manifest(ckpt)
    present = {}
    for name, rec in m.files.items():
        try:
            size = os.path.getsize(os.path.join(ckpt, name))
        except FileNotFoundError:
            size = None
        present[name] = "ok" if size == rec.size_bytes else ("missing" if size is None else "size mismatch")
    return {
        "path": ckpt,
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
    ckpt = resolve(path)
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
    """Every checkpoint directory under `root` with its status."""
    if not os.path.exists(root):
        raise RequestError(f"{root} does not exist", path=root)
    rows = []
    for c in list_checkpoints(root):
        row: dict[str, Any] = {"step": c.step, "path": c.path, "status": "incomplete", "tier": "persistent"}
        if c.complete:
            try:
                m = load_manifest(c.path)
                row.update(
                    status="complete",
                    created_s=m.created_s,
                    world_size=m.world_size,
                    stored_bytes=sum(f.size_bytes for f in m.files.values()),
                    num_tensors=len(m.tensors),
                )
            except ElastickitError as e:  # shown in the listing, not raised
                row.update(status=f"unreadable {MANIFEST_NAME}: {e}")
        rows.append(row)
    return rows
