"""Tier configuration: where checkpoints go, how long they stay, whether they are compressed.

    Tiers(
        memory=TierSpec(keep_last=1),                           # host snapshots, this process
        local=TierSpec(path="/dev/shm/ek/{node}", keep_last=2),  # node-local
        peer=True,                                              # a copy on a buddy node
        persistent=TierSpec(keep_last=5, zstd_level=3),         # path: the Checkpointer root
    )
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .paths import is_url, local_path, location


@dataclass(frozen=True, slots=True, kw_only=True)
class TierSpec:
    """One tier's place, retention and compression.

    Attributes:
        path: the directory (`{node}` and `{rank}` are filled in; empty for the persistent tier
            means the Checkpointer's root); `~` is expanded. The persistent tier may be an
            object-storage URL (`s3://bucket/run`, `gs://...`, `az://...`: any fsspec URL whose
            backend is installed; a URL without one is refused naming the package); the local
            tier is node-local, so it takes local paths only.
        storage_options: for a URL path, the fsspec backend's options (credentials, endpoint,
            e.g. `{"key": ..., "secret": ..., "endpoint_url": ...}` for s3fs); empty means what
            the backend reads from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`...).
            Never shown: not in repr, logs, events or manifests.
        keep_last: keep the newest N committed checkpoints (None: all).
        keep_every: also keep every checkpoint whose step is a multiple of this (None: none).
        zstd_level: compress rank files with zstd at this level (None: no compression).
        zstd_threads: zstd worker threads (0: the tier's own thread only).
        max_busy_fraction: the largest share of one CPU core the tier's thread may use: after a
            write that took C seconds of CPU it rests C * (1/f - 1) seconds before taking the
            next checkpoint (the newest one then; those in between are superseded). It keeps
            frequent checkpoints from competing with training for the CPU and the GIL (the
            default, 2%, holds checkpointing every step of a small model on 2 cores to about 2%
            of step time; 5% cost +8.5% there). A 1 GiB-per-rank state then reaches the tier at
            most about every 40 s (`wait()` and `close()` always write the newest at once);
            1.0 never rests.
    """

    path: str = ""
    keep_last: int | None = None
    keep_every: int | None = None
    zstd_level: int | None = None
    zstd_threads: int = 0
    max_busy_fraction: float = 0.02
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.path:  # a URL without a backend is refused here, before any run starts
            object.__setattr__(self, "path", location(self.path, what="the tier path"))
        if not isinstance(self.storage_options, Mapping):
            raise TypeError(f"storage_options must be a dict, got {type(self.storage_options).__name__}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {self.keep_last}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, got {self.keep_every}")
        if self.zstd_level is not None and not -7 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level must be in [-7, 22] or None, got {self.zstd_level}")
        if self.zstd_threads < 0:
            raise ValueError(f"zstd_threads must be >= 0, got {self.zstd_threads}")
        if not 0 < self.max_busy_fraction <= 1:
            raise ValueError(f"max_busy_fraction must be in (0, 1], got {self.max_busy_fraction}")

    def keeps(self, step: int, newer_committed: int) -> bool:
        """Whether retention keeps `step`, which has `newer_committed` newer checkpoints."""
        if self.keep_every is not None and step % self.keep_every == 0:
            return True
        return self.keep_last is None or newer_committed < self.keep_last


@dataclass(frozen=True, slots=True, kw_only=True)
class Tiers:
    """Which tiers a Checkpointer writes, in the order a checkpoint flows down them.

    Attributes:
        memory: keep the newest host snapshots in this process (restores in-process only).
        local: node-local storage (/dev/shm or NVMe); survives a worker restart, not a node loss.
        peer: also hold each rank's local files on a buddy rank of another node (needs `local`),
            so that losing one node loses nothing.
        persistent: shared storage (the Checkpointer root unless `path` is set).
        ranks_per_node: ranks per node, for `{node}` and the choice of buddies (default: the
            LOCAL_WORLD_SIZE torchrun sets, else the whole world is one node).
        host_buffers: snapshots held in host memory at once (default: one more than the file
            tiers, so that each tier can write one while saves go on); a save that finds none
            free is skipped (and logged) rather than blocking training.
    """

    memory: TierSpec | None = field(default_factory=lambda: TierSpec(keep_last=1))
    local: TierSpec | None = None
    peer: bool = False
    persistent: TierSpec | None = field(default_factory=TierSpec)
    ranks_per_node: int | None = None
    host_buffers: int = 0  # 0: the default above

    def __post_init__(self) -> None:
        if self.peer and self.local is None:
            raise ValueError("peer=True needs a local tier: peers hold copies of local checkpoints")
        if self.local is not None and not self.local.path:
            raise ValueError("the local tier needs a path, e.g. TierSpec(path='/dev/shm/ek/{node}')")
        if self.local is not None and is_url(self.local.path):
            local_path(self.local.path, what="the local tier path")  # raises: node-local means a local path
        if self.host_buffers < 0:
            raise ValueError(f"host_buffers must be >= 1, got {self.host_buffers}")
        if self.host_buffers == 0:
            files = (self.local is not None) + (self.persistent is not None)
            object.__setattr__(self, "host_buffers", max(2, files + 1))
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {self.ranks_per_node}")
        if self.memory is None and self.local is None and self.persistent is None:
            raise ValueError("at least one tier must be configured")

    def node_size(self, world_size: int) -> int:
        n = self.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        return max(1, min(n, world_size))

    def local_path(self, rank: int, world_size: int) -> str:
        assert self.local is not None
        return self.local.path.format(node=rank // self.node_size(world_size), rank=rank)

    def buddy(self, rank: int, world_size: int) -> int:
        """The rank that holds copies of `rank`'s local files: same local rank, next node."""
        n = self.node_size(world_size)
        nodes = max(1, world_size // n)
        return ((rank // n + 1) % nodes) * n + rank % n

    def ward(self, rank: int, world_size: int) -> int:
        """The rank whose local files `rank` holds (the inverse of `buddy`)."""
        n = self.node_size(world_size)
        nodes = max(1, world_size // n)
        return ((rank // n - 1) % nodes) * n + rank % n
