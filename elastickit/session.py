"""The process-group side of a Checkpointer: who this rank is, its claim of the root, the store
key prefix its rounds use, the gloo group for peer copies, and the layout it records."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from elastickit.checkpoint.coord import Coordinator, LocalCoordinator, StoreCoordinator
from elastickit.checkpoint.errors import RequestError
from elastickit.checkpoint.events import EventLog
from elastickit.checkpoint.format.manifest import LayoutRecord
from elastickit.checkpoint.lock import LOCK_NAME
from elastickit.checkpoint.paths import is_url, local_path
from elastickit.checkpoint.runs import RootClaim, claim_root, join_run
from elastickit.checkpoint.tiers import Tiers

log = logging.getLogger("elastickit")


def event_log_path(root: str, events: str | None) -> str | None:
    """Where the event log goes: `events` (a local path), else `<root>/events.jsonl`; none for
    a URL root (an object store has no append: the log is local, where `events` says)."""
    if events:
        return local_path(events, what="the events path")
    if not is_url(root):
        return os.path.join(root, "events.jsonl")
    log.info("elastickit: no event log for %s (give events='a local path' to keep one)", root)
    return None


def open_event_log(root: str, events: str | None, *, rank: int) -> EventLog:
    """The event log (rank 0 writes it; the others get one that writes nothing). A log in the
    root is written only while the root holds its lock file: an unmounted root's empty mount
    point must not receive a new log (the records wait in memory meanwhile)."""
    lock_file = os.path.join(root, LOCK_NAME)
    in_root = events is not None and os.path.dirname(os.path.abspath(events)) == os.path.abspath(root)
    return EventLog(
        events if rank == 0 else None,
        requires=lock_file if in_root and os.path.exists(lock_file) else None,
    )


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without an initialized process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def layout_record(layout: Any, world_size: int) -> LayoutRecord:
    """The manifest's record of `layout` (a ParallelLayout, a DeviceMesh, a dict of axis sizes,
    or None: one axis over the world)."""
    if layout is None:
        return LayoutRecord(axes=(("world", world_size),))
    if isinstance(layout, LayoutRecord):
        return layout
    if hasattr(layout, "to_record"):  # elastickit.reshard ParallelLayout
        return layout.to_record()
    if hasattr(layout, "mesh_dim_names") and hasattr(layout, "shape"):  # a DeviceMesh
        names = layout.mesh_dim_names or tuple(f"dim{i}" for i in range(layout.ndim))
        return LayoutRecord(axes=tuple(zip(names, (int(n) for n in layout.shape), strict=True)))
    if isinstance(layout, Mapping):
        return LayoutRecord(axes=tuple((str(k), int(v)) for k, v in layout.items()))
    raise RequestError(
        f"layout must be a ParallelLayout, a DeviceMesh or a dict of axis sizes, got {type(layout).__name__}"
    )


def agree(rank: int, world_size: int, first: dict[str, str], *, peer_group: bool) -> tuple[str, Any, dict[str, str]]:
    """A fresh store key prefix, the peer group (when `peer_group`), and rank 0's `first`, on
    every rank. Every rank calls it at the same point (its Checkpointer's construction)."""
    if world_size == 1:
        return "local", None, first
    import torch.distributed as dist

    # One broadcast agrees on a fresh key prefix: a restarted job never reads a previous
    # incarnation's keys.
    got = [(os.urandom(8).hex(), first) if rank == 0 else None]
    dist.broadcast_object_list(got, src=0)
    # Peer copies and peer fetches travel on their own gloo group, never the training one.
    group = dist.new_group(backend="gloo") if peer_group else None
    nonce, first = got[0]
    return str(nonce), group, dict(first)


def coordinator(rank: int, world_size: int, prefix: str, timeout_s: float) -> Coordinator:
    """The store all-gather for one purpose (`prefix` keeps the purposes apart)."""
    if world_size == 1:
        return LocalCoordinator()
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    return StoreCoordinator(store, rank=rank, world_size=world_size, prefix=prefix, timeout_s=timeout_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """One Checkpointer's place in the job.

    Attributes:
        claim: rank 0's claim of the root (None on other ranks); release it last.
        peer_group: the gloo group for peer copies and fetches (None without a local tier).
        coord: the main store all-gather (restores, schedule rounds); one object, as its rounds
            are counted.
        coord_for: the store all-gather for one purpose (`coord_for("main")`, one per tier).
        local_root: this rank's directory in the local tier (None without one).
        nonce: this job incarnation's store key prefix is `elastickit/<nonce>/`.
    """

    claim: RootClaim | None
    peer_group: Any
    coord: Coordinator
    coord_for: Callable[[str], Coordinator]
    local_root: str | None
    nonce: str


def open_session(root: str, *, rank: int, world_size: int, tiers: Tiers, events: str | None, timeout_s: float) -> Session:
    """Claim `root` and join its run, on every rank at once.

    Rank 0 claims the root (a writable root, not a checkpoint; its writer lock; the run's key);
    every rank then checks what it writes, and all raise together if any failed.
    """
    persistent = (tiers.persistent.path or root) if tiers.persistent is not None else None
    claim: RootClaim | None = None
    first: dict[str, str] = {}
    if rank == 0:
        try:
            claim = claim_root(
                root,
                persistent=persistent,
                events_dir=os.path.dirname(os.path.abspath(events)) if events else None,
                storage_options=tiers.persistent.storage_options if tiers.persistent is not None else None,
            )
            first = {"key": claim.key, "anchor": claim.anchor}
        except RequestError as e:
            first = {"error": str(e)}
    nonce, group, first = agree(rank, world_size, first, peer_group=tiers.local is not None)

    def coord_for(name: str) -> Coordinator:
        return coordinator(rank, world_size, f"elastickit/{nonce}/{name}", timeout_s)

    coord = coord_for("main")
    try:
        local_base = tiers.local_path(rank, world_size) if tiers.local is not None else None
        local_root = join_run(coord, first, persistent=persistent, local_base=local_base)
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    return Session(claim=claim, peer_group=group, coord=coord, coord_for=coord_for, local_root=local_root, nonce=nonce)
