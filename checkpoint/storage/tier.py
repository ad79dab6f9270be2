"""The `Tier` protocol: what the save driver and the restore driver ask of any storage.

Call order, on every rank of a tier's group, for one save (`writer.write_checkpoint`):

1. `prepare(step, leader=rank == 0)`: make room for `step`; the leader retires an existing
   manifest of `step` first, so a re-save never leaves a manifest naming files being rewritten.
2. `write_rank_file(step, name, items, ...)`: every rank that owns tensors writes its file; the
   file is durable (or the object confirmed) on return.
3. `commit(step, manifest)`: rank 0 only, after every rank's file is durable: the manifest goes
   last and the step becomes visible to readers.
4. `after_commit(manifest)`: every rank (a node-local tier shares the manifest and copies files
   to buddies here; other tiers do nothing). Then `retain(spec)` on the ranks `retains` names.

Readers: `committed()`, `read_manifest(step)`, `open_step(step)` (the executor's `StepSource`),
and, for the restore driver's inventory, `inventory()` / `restorable(...)` / `unservable(...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..coord import Coordinator
    from ..format.manifest import FileRecord, Manifest


class StepReader(Protocol):
    """A committed step as readers take it (`reshard.executor.StepSource`)."""

    manifest: Manifest
    where: str

    def open(self, name: str, record: FileRecord, *, verify: bool = True) -> Any: ...


class Tier(Protocol):
    """A place that holds committed checkpoints (see the module docstring for the call order).

    Attributes:
        name: the tier's name in events and reports ("local", "persistent").
        root: where it is (a path or a URL), for messages.
        shares_manifest: whether ranks other than 0 need the committed manifest after a save.
    """

    name: str
    root: str
    shares_manifest: bool

    def step_where(self, step: int) -> str:
        """What messages and reports call `step` on this tier (its directory or URL)."""
        ...

    def committed(self) -> list[int]:
        """The steps committed here, oldest first."""
        ...

    def prepare(self, step: int, *, leader: bool) -> None: ...

    def write_rank_file(
        self,
        step: int,
        name: str,
        items: Sequence[tuple[str, torch.Tensor]],
        *,
        rank: int,
        fsync: bool,
        zstd_level: int | None,
        zstd_threads: int,
        before_item: Callable[[str], None] | None,
    ) -> FileRecord: ...

    def commit(self, step: int, manifest: Manifest, *, fsync: bool) -> None: ...

    def after_commit(self, manifest: Manifest) -> dict[str, Any]:
        """Work every rank does once `manifest` is committed; returns stats for the event log."""
        ...

    def discard_partial(self, step: int) -> None:
        """After a failed save of `step` (every rank past writing): remove what it left
        uncommitted, so that a full disk is not filled further by the attempts. Called on the
        ranks `retains` names."""
        ...

    def retains(self, rank: int) -> bool:
        """Whether `rank` applies retention on this tier (one rank per copy of the tier)."""
        ...

    def retain(self, keeps: Callable[[int, int], bool]) -> None:
        """Delete the committed steps `keeps(step, newer_committed)` rejects (manifest first),
        and incomplete steps older than the newest committed one."""
        ...

    def read_manifest(self, step: int) -> Manifest: ...

    def open_step(self, step: int, manifest: Manifest | None = None) -> StepReader: ...

    def restore_manifest(self, coord: Coordinator, step: int) -> Manifest:
        """`step`'s manifest on every rank of a restore (a node-local tier shares it)."""
        ...

    def bring_files(self, coord: Coordinator, group: Any, manifest: Manifest, files: set[str]) -> list[str]:
        """Make `files` of `manifest` readable on this rank before a restore reads them; returns
        the names received from other ranks (a node-local tier fetches from buddies)."""
        ...

    def inventory(self, rank: int) -> Any:
        """What this rank publishes about the tier for a restore (JSON)."""
        ...

    def restorable(self, gathered: Sequence[Any]) -> list[int]:
        """The steps a restore can read, from every rank's `inventory` (a pure function)."""
        ...

    def unservable(self, gathered: Sequence[Any]) -> dict[int, str]:
        """Steps committed here that `restorable` leaves out because the tier cannot serve them
        whole (a damaged manifest, a file lost on every node), with why; a pure function."""
        ...


def shared_restorable(gathered: Sequence[Any]) -> list[int]:
    """For a tier every rank reads alike: rank 0's committed steps."""
    return list(gathered[0]) if gathered else []


def retain_order(steps: list[int], keeps: Callable[[int, int], bool]) -> list[int]:
    """The steps (oldest first) that retention deletes."""
    return [s for i, s in enumerate(steps) if not keeps(s, len(steps) - 1 - i)]
