"""Finding the freshest checkpoint across tiers and bringing its files to the ranks that read them.

Node-local tiers hold, on each node, the manifest, that node's rank files and (with peers) copies
of a buddy node's files. After a node is lost, the union over the surviving nodes still holds
every file; a rank that needs a file it does not have receives it from a rank that does, over
the Checkpointer's dedicated gloo group. Every decision is a pure function of the inventories
every rank published, so all ranks agree without a leader.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .coord import Coordinator
from .errors import DataError
from .format.directory import list_checkpoints
from .format.integrity import atomic_write
from .format.manifest import MANIFEST_NAME, Manifest, step_dir_name

TIER_PREFERENCE = {"memory": 0, "local": 1, "persistent": 2}


def local_inventory(root: str) -> dict[str, Any]:
    """step -> {"files": {name: size}, "needs": {name: size} (from the manifest, if present)}."""
    out: dict[str, Any] = {}
    for c in list_checkpoints(root):
        files = {}
        for name in os.listdir(c.path):
            if name.startswith("rank-") and not name.endswith(".tmp"):
                files[name] = os.path.getsize(os.path.join(c.path, name))
        entry: dict[str, Any] = {"files": files}
        if c.complete:
            try:
                with open(os.path.join(c.path, MANIFEST_NAME), encoding="utf-8") as f:
                    d = json.load(f)
                entry["needs"] = {n: int(r["size_bytes"]) for n, r in d["files"].items()}
            except (OSError, ValueError, KeyError):
                pass  # an unreadable manifest: this rank cannot vouch for the step
        out[str(c.step)] = entry
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A checkpoint some tier can serve: its step and the tier."""

    step: int
    tier: str


def candidates(gathered: list[dict[str, Any]]) -> list[Candidate]:
    """Every restorable (step, tier), freshest first, the faster tier first for equal steps.

    `gathered[r]` is rank r's {"memory": [steps], "local": inventory, "persistent": [steps]}.
    """
    out: set[tuple[int, str]] = set()
    mem = [set(g.get("memory", [])) for g in gathered]
    for step in set.intersection(*mem) if mem else set():
        out.add((step, "memory"))
    steps: set[str] = set()
    for g in gathered:
        steps.update((g.get("local") or {}).keys())
    for s in steps:
        needs = next((g["local"][s]["needs"] for g in gathered if s in (g.get("local") or {}) and "needs" in g["local"][s]), None)
        if needs is None:
            continue
        have: set[tuple[str, int]] = set()
        for g in gathered:
            for name, size in ((g.get("local") or {}).get(s, {}).get("files") or {}).items():
                have.add((name, size))
        if all((n, size) in have for n, size in needs.items()):
            out.add((int(s), "local"))
    for step in gathered[0].get("persistent", []):
        out.add((step, "persistent"))
    return [Candidate(step=s, tier=t) for s, t in sorted(out, key=lambda x: (-x[0], TIER_PREFERENCE[x[1]]))]


def share_manifest(coord: Coordinator, root: str, step: int) -> Manifest:
    """The manifest of `step` on every rank, from whichever rank's local directory has it."""
    path = os.path.join(root, step_dir_name(step), MANIFEST_NAME)
    text = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    got = coord.all_gather(text if coord.rank == min_rank_with(coord, text is not None) else None, phase="manifest share")
    mine = next((t for t in got if t is not None), None)
    if mine is None:
        raise DataError(f"no rank holds the manifest of step {step} in its local tier", path=path)
    manifest = Manifest.loads(mine, source=path)
    if text is None:  # keep a copy here: this directory becomes self-describing again
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, mine)
    return manifest


def min_rank_with(coord: Coordinator, has: bool) -> int:
    """The lowest rank for which `has` is true (every rank calls it; -1 if none)."""
    got = coord.all_gather(has, phase="who has")
    return next((r for r, h in enumerate(got) if h), -1)


def fetch_files(
    coord: Coordinator,
    group: Any,
    root: str,
    manifest: Manifest,
    needed: set[str],
) -> list[str]:
    """Bring the files this rank needs (and lacks) into its local directory of `manifest.step`.

    Collective over all ranks. Returns the names received here.
    """
    step_dir = os.path.join(root, step_dir_name(manifest.step))
    os.makedirs(step_dir, exist_ok=True)

    def present(name: str) -> bool:
        p = os.path.join(step_dir, name)
        return os.path.exists(p) and os.path.getsize(p) == manifest.files[name].size_bytes

    missing = sorted(n for n in needed if not present(n))
    have = sorted(n for n in manifest.files if present(n))
    got = coord.all_gather({"missing": missing, "have": have}, phase="peer fetch plan")
    transfers = []  # (file, src, dst), identical on every rank
    for dst, g in enumerate(got):
        for name in g["missing"]:
            src = next((r for r, h in enumerate(got) if name in h["have"]), None)
            if src is None:
                raise DataError(
                    f"no rank holds {name} of step {manifest.step} any more; it cannot be restored from the local tier",
                    path=os.path.join(step_dir, name),
                )
            transfers.append((name, src, dst))
    if not transfers:
        return []
    import torch.distributed as dist

    received = []
    for name, src, dst in transfers:
        if coord.rank == src:
            with open(os.path.join(step_dir, name), "rb") as f:
                data = f.read()
            dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst, group=group)
        elif coord.rank == dst:
            buf = torch.empty(manifest.files[name].size_bytes, dtype=torch.uint8)
            dist.recv(buf, src, group=group)
            atomic_write(os.path.join(step_dir, name), memoryview(buf.numpy()))
            received.append(name)
    return received
