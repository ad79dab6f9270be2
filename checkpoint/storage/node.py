"""The node-local tier: step directories on each node (/dev/shm or NVMe), with the manifest on
every node and, with peers, each rank's file also on a buddy rank of the next node.

After a node is lost, the union over the surviving nodes still holds every file; a rank that
needs a file it does not have receives it from a rank that does, over the Checkpointer's
dedicated gloo group. Every decision is a pure function of the inventories every rank
published, so all ranks agree without a leader.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..coord import Coordinator
from ..errors import DataError
from ..format.directory import list_checkpoints, read_manifest_text
from ..format.integrity import atomic_write
from ..format.manifest import MANIFEST_NAME, Manifest
from .files import DirTier


class NodeTier(DirTier):
    """A node-local copy of each checkpoint (see the module docstring). Implements `tier.Tier`.

    `node_size`: ranks per node; `buddy`/`ward`: the rank that holds this rank's files and the
    rank whose files this rank holds (None: no peer copies); `peer_group`: the gloo group that
    carries them; `markers`: see `DirTier`.
    """

    shares_manifest = True

    def __init__(
        self,
        name: str,
        root: str,
        *,
        rank: int,
        node_size: int,
        buddy: int | None = None,
        ward: int | None = None,
        peer_group: Any = None,
        fsync: bool = True,
        markers: Sequence[str] = (),
    ) -> None:
        super().__init__(name, root, markers=markers)
        self.rank, self.node_size = rank, node_size
        self.buddy, self.ward, self.peer_group, self.fsync = buddy, ward, peer_group, fsync

    def retains(self, rank: int) -> bool:
        return rank % self.node_size == 0

    def after_commit(self, manifest: Manifest) -> dict[str, Any]:
        # Rank 0 committed the manifest in its node's directory; every other node gets a copy,
        # so that each node-local directory is self-describing.
        if self.retains(self.rank) and self.rank != 0:
            d = self.step_where(manifest.step)
            os.makedirs(d, exist_ok=True)
            atomic_write(os.path.join(d, MANIFEST_NAME), manifest.dumps(), fsync=self.fsync)
        if self.buddy is None or self.ward is None:
            return {}
        t0 = time.monotonic()
        sent = self._peer_copy(manifest)
        return {"peer_bytes": sent, "peer_s": round(time.monotonic() - t0, 6)}

    def _peer_copy(self, manifest: Manifest) -> int:
        """Send this rank's file to its buddy; store the ward's file here. Returns bytes sent."""
        import torch.distributed as dist

        buddy, ward, group = self.buddy, self.ward, self.peer_group
        assert buddy is not None and ward is not None
        if buddy == self.rank:
            return 0
        step_dir = self.step_where(manifest.step)
        mine = [f for f in manifest.files.values() if f.rank == self.rank]
        data = b""
        if mine:
            with open(os.path.join(step_dir, mine[0].name), "rb") as f:
                data = f.read()
        size_out = torch.tensor([len(data)], dtype=torch.int64)
        size_in = torch.zeros(1, dtype=torch.int64)
        works = [dist.isend(size_out, buddy, group=group), dist.irecv(size_in, ward, group=group)]
        for w in works:
            w.wait()
        buf_in = torch.empty(int(size_in.item()), dtype=torch.uint8)
        works = []
        if data:
            works.append(dist.isend(torch.frombuffer(bytearray(data), dtype=torch.uint8), buddy, group=group))
        if buf_in.numel():
            works.append(dist.irecv(buf_in, ward, group=group))
        for w in works:
            w.wait()
        theirs = [f for f in manifest.files.values() if f.rank == ward]
        if theirs and buf_in.numel():
            atomic_write(os.path.join(step_dir, theirs[0].name), memoryview(buf_in.numpy()), fsync=self.fsync)
        return len(data)

    # -- restore ----------------------------------------------------------------------------

    def inventory(self, rank: int) -> dict[str, Any]:
        return node_inventory(self.root)

    def restorable(self, gathered: Sequence[Any]) -> list[int]:
        """The steps whose every file some rank holds, with a manifest on some rank."""
        return local_restorable(gathered)

    def unservable(self, gathered: Sequence[Any]) -> dict[int, str]:
        """Steps some node committed that no node can serve whole, with why."""
        return local_unservable(gathered)

    def restore_manifest(self, coord: Coordinator, step: int) -> Manifest:
        """The manifest of `step` on every rank, from whichever rank's directory has an intact
        copy (a damaged copy on one node does not stop the others)."""
        path = os.path.join(self.step_where(step), MANIFEST_NAME)
        text, error = None, None
        try:
            text = read_manifest_text(path)
            Manifest.loads(text, source=path)
        except FileNotFoundError:
            text = None
        except (OSError, DataError) as e:
            text, error = None, str(e)
        got = coord.all_gather(
            {"text": text if coord.rank == _min_rank_with(coord, text is not None) else None, "error": error},
            phase="manifest share",
        )
        mine = next((g["text"] for g in got if g["text"] is not None), None)
        if mine is None:
            why = next((g["error"] for g in got if g["error"]), None)
            if why is not None:
                raise DataError(f"no rank holds an intact manifest of step {step} in its local tier: {why}", path=path)
            raise DataError(f"no rank holds the manifest of step {step} in its local tier", path=path)
        manifest = Manifest.loads(mine, source=path)
        if text is None:  # keep a copy here: this directory becomes self-describing again
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, mine)
        return manifest

    def bring_files(self, coord: Coordinator, group: Any, manifest: Manifest, files: set[str]) -> list[str]:
        """Bring the files this rank needs (and lacks) into its directory of `manifest.step`.

        Collective over all ranks. Returns the names received here.
        """
        step_dir = self.step_where(manifest.step)
        os.makedirs(step_dir, exist_ok=True)

        def present(name: str) -> bool:
            p = os.path.join(step_dir, name)
            return os.path.exists(p) and os.path.getsize(p) == manifest.files[name].size_bytes

        missing = sorted(n for n in files if not present(n))
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


def node_inventory(root: str) -> dict[str, Any]:
    """What one rank's node-local directory holds: step -> {"files": {name: size}, "needs":
    {name: size} (from the manifest, if present and intact), "bad_manifest": why this rank's
    manifest cannot be used (if present and damaged)}."""
    out: dict[str, Any] = {}
    for c in list_checkpoints(root):
        files = {}
        for name in os.listdir(c.path):
            if name.startswith("rank-") and not name.endswith(".tmp"):
                files[name] = os.path.getsize(os.path.join(c.path, name))
        entry: dict[str, Any] = {"files": files}
        if c.complete:
            mpath = os.path.join(c.path, MANIFEST_NAME)
            try:
                # Verified whole (its own checksum): a damaged copy must not vouch for the step.
                manifest = Manifest.loads(read_manifest_text(mpath), source=mpath)
                entry["needs"] = {n: r.size_bytes for n, r in manifest.files.items()}
            except FileNotFoundError:
                pass  # removed since the listing (retention)
            except (OSError, DataError) as e:
                entry["bad_manifest"] = str(e)
        out[str(c.step)] = entry
    return out


def local_restorable(gathered: Sequence[dict[str, Any]]) -> list[int]:
    """From every rank's node-local inventory: the steps whose every file some rank holds (at
    the size the manifest says) and whose manifest some rank holds; a pure function."""
    steps: set[str] = set()
    for g in gathered:
        steps.update((g or {}).keys())
    out = []
    for s in steps:
        needs = next((g[s]["needs"] for g in gathered if s in (g or {}) and "needs" in g[s]), None)
        if needs is None:
            continue
        have: set[tuple[str, int]] = set()
        for g in gathered:
            for name, size in ((g or {}).get(s, {}).get("files") or {}).items():
                have.add((name, size))
        if all((n, size) in have for n, size in needs.items()):
            out.append(int(s))
    return sorted(out)


def local_unservable(gathered: Sequence[dict[str, Any]]) -> dict[int, str]:
    """From every rank's node-local inventory: the steps some node committed that
    `local_restorable` leaves out, with why (every copy of the manifest is damaged, or a file is
    missing or has the wrong size on every node); a pure function."""
    out: dict[int, str] = {}
    entries: dict[str, list[dict[str, Any]]] = {}
    for g in gathered:
        for s, e in (g or {}).items():
            entries.setdefault(s, []).append(e)
    for s, es in entries.items():
        needs = next((e["needs"] for e in es if "needs" in e), None)
        if needs is None:
            bad = next((e["bad_manifest"] for e in es if "bad_manifest" in e), None)
            if bad is not None:
                out[int(s)] = bad
            continue
        have: dict[str, set[int]] = {}
        for e in es:
            for name, size in (e.get("files") or {}).items():
                have.setdefault(name, set()).add(size)
        lost = []
        for name, size in sorted(needs.items()):
            if size not in have.get(name, set()):
                sizes = sorted(have.get(name, set()))
                lost.append(f"{name} is " + (f"{sizes[0]} bytes instead of {size}" if sizes else "missing"))
        if lost:
            out[int(s)] = f"on every node that holds step {s}: {'; '.join(lost)}"
    return out


def _min_rank_with(coord: Coordinator, has: bool) -> int:
    """The lowest rank for which `has` is true (every rank calls it; -1 if none)."""
    got = coord.all_gather(has, phase="who has")
    return next((r for r, h in enumerate(got) if h), -1)
