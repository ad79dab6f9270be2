"""The memory tier: the newest host snapshots of this process, as a `Tier` for restores.

It holds no files: the save scheduler's board hands it each new snapshot (`hold`) and takes
buffers back from it (`drop`); a restore in the same process asks it, like any tier, what it
holds (`inventory`, `restorable`) and reads a step from it (`snapshot`). The write side of the
protocol (rank files, manifests) does not apply and says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import RequestError

if TYPE_CHECKING:
    from ..drivers.snapshot import Snapshot

#: The memory tier's name in events and reports, and its reference on a host buffer.
MEMORY = "memory"


class MemoryTier:
    """The newest `keep` snapshots of this process (restores in-process only)."""

    name = MEMORY
    root = MEMORY
    shares_manifest = False

    def __init__(self, keep: int) -> None:
        self.keep = max(1, keep)
        self._lock = threading.Lock()
        self._snaps: list[Snapshot] = []  # newest last

    # Kept by the save scheduler.

    def hold(self, snap: Snapshot) -> list[Snapshot]:
        """Keep `snap` as the newest; returns those it no longer keeps (oldest first)."""
        with self._lock:
            self._snaps.append(snap)
            out, self._snaps = self._snaps[: -self.keep], self._snaps[-self.keep :]
            return out

    def drop(self, snap: Snapshot) -> None:
        """No longer keep `snap` (its buffer goes to a new snapshot)."""
        with self._lock:
            if snap in self._snaps:
                self._snaps.remove(snap)

    def outgoing(self) -> list[Snapshot]:
        """What the next `hold` lets go of."""
        with self._lock:
            return self._snaps[: max(0, len(self._snaps) - self.keep + 1)]

    def __contains__(self, snap: object) -> bool:
        with self._lock:
            return snap in self._snaps

    def snapshots(self) -> list[Snapshot]:
        """What it holds, oldest first."""
        with self._lock:
            return list(self._snaps)

    # Read by a restore.

    def snapshot(self, step: int) -> Snapshot:
        """The newest snapshot of `step` (one `committed` names)."""
        return next(s for s in reversed(self.snapshots()) if s.step == step)

    def step_where(self, step: int) -> str:
        return MEMORY

    def committed(self) -> list[int]:
        return sorted({s.step for s in self.snapshots()})

    def inventory(self, rank: int) -> Any:
        return self.committed()

    def restorable(self, gathered: Sequence[Any]) -> list[int]:
        """The steps every rank holds (a snapshot is this process's alone)."""
        held = [set(g or ()) for g in gathered]
        return sorted(set.intersection(*held)) if held else []

    def unservable(self, gathered: Sequence[Any]) -> dict[int, str]:
        return {}

    def retains(self, rank: int) -> bool:
        return True

    def retain(self, keeps: Callable[[int, int], bool]) -> None:
        """Retention is `keep`, applied by `hold`."""

    # The file side of the protocol does not apply.

    def _no_files(self, *_a: Any, **_k: Any) -> Any:
        raise RequestError("the memory tier holds host snapshots, not files: save through the Checkpointer")

    prepare = write_rank_file = commit = discard_partial = read_manifest = open_step = _no_files
    restore_manifest = bring_files = _no_files

    def after_commit(self, manifest: Any) -> dict[str, Any]:
        return {}
