"""The CLI's checkpoint arguments on object storage (`s3://bucket/run`, ...): ls, inspect, verify
read the store directly (listing, the manifest, ranged reads); reshard reads its source by
ranged reads; convert, whose many formats read and write plain folders, stages a URL source or
destination through a local temporary directory (`TMPDIR`, which needs room for one checkpoint).

An output URL must hold nothing yet, and is uploaded only once the output is complete, data
first and the commit marker (`manifest.json`, DCP's `.metadata`) last: a reader never sees a
step before its data.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from elastickit.checkpoint.errors import ElastickitError, IncompleteCheckpointError, RequestError
from elastickit.checkpoint.format.manifest import MANIFEST_NAME, STEP_DIR_RE
from elastickit.checkpoint.storage.objstore import ObjectRoot


def object_step(url: str) -> tuple[ObjectRoot, int]:
    """(root, step) for a URL naming a checkpoint root (its newest committed step) or one
    checkpoint (`.../step-00000042`)."""
    base, _, name = url.rstrip("/").rpartition("/")
    m = STEP_DIR_RE.match(name)
    if m and base:
        return ObjectRoot(base, what="CKPT"), int(m.group(1))
    root = ObjectRoot(url, what="CKPT")
    steps = root.committed_steps()
    if not steps:
        if root.is_empty():
            raise RequestError(f"{root.url} holds nothing (no step-*/ objects); check the URL", path=root.url)
        raise IncompleteCheckpointError(f"{root.url} holds no committed checkpoint (no step-*/manifest.json)", path=root.url)
    return root, steps[-1]


def list_object_root(url: str) -> list[dict[str, Any]]:
    """`inspection.list_root` for a URL: every step prefix with its status, oldest first (one
    listing and one manifest read per committed step; sizes checked, bytes not read)."""
    root = ObjectRoot(url, what="ROOT")
    found = root.objects()
    if not found and root.is_empty():
        raise RequestError(f"{root.url} holds nothing (no step-*/ objects); check the URL", path=root.url)
    rows = []
    for step, sizes in sorted(found.items()):
        row: dict[str, Any] = {"step": step, "path": root.step_url(step), "tier": "persistent"}
        if MANIFEST_NAME not in sizes:
            row.update(status="incomplete", reason=f"no {MANIFEST_NAME}: the save never committed (or is still being uploaded)")
            rows.append(row)
            continue
        try:
            m = root.read_manifest(step)
        except ElastickitError as e:
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
        missing = [f"{n} is missing" for n in sorted(m.files) if n not in sizes]
        wrong = [
            f"{n} has {sizes[n]} bytes but the manifest says {r.size_bytes}"
            for n, r in sorted(m.files.items())
            if n in sizes and sizes[n] != r.size_bytes
        ]
        if missing or wrong:
            row.update(
                status="incomplete" if missing else "damaged",
                reason="; ".join(missing + wrong) + f"; run elastickit verify {root.step_url(step)}",
            )
        rows.append(row)
    return rows


def inspect_object(url: str) -> tuple[str, Any, dict[str, str]]:
    """What `inspection.inspect_checkpoint` describes for a URL: the step's URL, its manifest,
    and each rank file's state from the objects' sizes ("ok", "missing", "size mismatch")."""
    root, step = object_step(url)
    m = root.read_manifest(step)
    sizes = root.objects().get(step, {})
    present = {
        n: "ok" if sizes.get(n) == r.size_bytes else ("missing" if n not in sizes else "size mismatch")
        for n, r in m.files.items()
    }
    return root.step_url(step), m, present


def verify_object(url: str) -> dict[str, Any]:
    """`inspection.verify` for a URL: every byte read back by ranged GETs and checked."""
    root, step = object_step(url)
    problems = root.verify_step(step)
    m = root.read_manifest(step)
    return {
        "path": root.step_url(step),
        "step": m.step,
        "files_checked": len(m.files),
        "bytes_checked": sum(f.size_bytes for f in m.files.values()),
        "ok": not problems,
        "problems": [{"file": p.file, "tensors": list(p.tensors), "reason": p.reason} for p in problems],
    }


@contextmanager
def local_source(url: str) -> Iterator[str]:
    """A local copy of the checkpoint at `url`: an elastickit root's newest step (or the step
    named), else everything under the URL (another format's folder), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="elastickit-src-") as tmp:
        root = ObjectRoot(url, what="SRC")
        base, _, name = root.url.rpartition("/")
        m = STEP_DIR_RE.match(name)
        if m:
            yield ObjectRoot(base, what="SRC").download_step(int(m.group(1)), tmp)
            return
        steps = root.committed_steps()
        if steps:
            root.download_step(steps[-1], tmp)
            yield tmp
            return
        if root.is_empty():
            raise RequestError(f"SRC {root.url} holds nothing; check the URL", path=root.url)
        yield root.download_tree(os.path.join(tmp, "src"))


@contextmanager
def upload_destination(url: str, *, sources: list[str]) -> Iterator[str]:
    """A local directory to write the output into; uploaded to `url` (which must hold nothing
    and not be a source) once the body of the `with` completed."""
    dst = ObjectRoot(url, what="DST")
    for s in sources:
        s = s.rstrip("/")
        if dst.url == s or dst.url.startswith(s + "/") or s.startswith(dst.url + "/"):
            raise RequestError(f"DST {dst.url} overlaps the source {s}; write to a new prefix (the source is never modified)", path=dst.url)
    if not dst.is_empty():
        raise RequestError(f"DST {dst.url} is not empty; write to a new prefix", path=dst.url)
    with tempfile.TemporaryDirectory(prefix="elastickit-dst-") as tmp:
        out = os.path.join(tmp, "out")
        yield out
        dst.upload_tree(out)
