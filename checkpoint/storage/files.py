"""A tier of step directories under a POSIX root: `<root>/step-<8 digits>/`, committed by the
manifest's atomic rename (DESIGN.md section 2)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..coord import Coordinator
from ..errors import ElastickitError
from ..format.directory import StepDir, list_checkpoints, load_manifest
from ..format.integrity import commit_step, fsync_dir
from ..format.manifest import MANIFEST_NAME, FileRecord, Manifest, step_dir_name
from ..format.stfile import write_file
from .tier import retain_order, shared_restorable


class RootGoneError(ElastickitError):
    """The checkpoint root is not there any more (its message says so, whole)."""


class DirTier:
    """Checkpoints as step directories under `root`, one copy that rank 0 looks after (the
    persistent tier on a shared file system). Implements `tier.Tier`.

    `markers`: files the root must still hold (its lock file, its run label): without them the
    root was deleted, replaced or unmounted, and nothing is written there (empty: a new root,
    made when missing, as convert and reshard write).
    """

    shares_manifest = False

    def __init__(self, name: str, root: str, *, markers: Sequence[str] = ()) -> None:
        self.name = name
        self.root = root
        self.markers = tuple(markers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.root!r})"

    def step_where(self, step: int) -> str:
        return os.path.join(self.root, step_dir_name(step))

    def committed(self) -> list[int]:
        return [c.step for c in list_checkpoints(self.root) if c.complete]

    def prepare(self, step: int, *, leader: bool) -> None:
        step_dir = self.step_where(step)
        if self.markers:
            self._check_root()
            try:
                # Never makedirs: a root that vanished (deleted, unmounted) is not made again, in
                # what may now be another file system (an unmounted share's empty mount point).
                os.mkdir(step_dir)
            except FileExistsError:
                pass
        else:  # a new root (convert, reshard), or one that held nothing to check it by
            os.makedirs(step_dir, exist_ok=True)
        if leader:
            man = os.path.join(step_dir, MANIFEST_NAME)
            if os.path.exists(man):
                os.replace(man, man + ".replaced")
                fsync_dir(step_dir)

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise RootGoneError(
                f"the checkpoint directory {self.root} is gone (deleted, moved or unmounted); nothing "
                "is written in its place, and saving resumes when it is back",
                path=self.root,
            )
        for m in self.markers:
            if not os.path.exists(os.path.join(self.root, m)):
                raise RootGoneError(
                    f"the checkpoint directory {self.root} no longer holds its {m} (it was emptied, "
                    "replaced or unmounted); nothing is written there, and saving resumes when it is "
                    "back (if you made it again on purpose, restart the job)",
                    path=self.root,
                )

    def discard_partial(self, step: int) -> None:
        """Remove the uncommitted directory of `step` after a failed save, so that a full disk is
        not filled further by the attempts (call on the rank `retains` names, once every rank is
        past writing)."""
        d = self.step_where(step)
        if os.path.isdir(d) and not os.path.exists(os.path.join(d, MANIFEST_NAME)):
            shutil.rmtree(d, ignore_errors=True)

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
    ) -> FileRecord:
        step_dir = self.step_where(step)
        record = write_file(
            os.path.join(step_dir, name),
            items,
            rank=rank,
            fsync=fsync,
            zstd_level=zstd_level,
            zstd_threads=zstd_threads,
            before_item=before_item,
        )
        if fsync:
            fsync_dir(step_dir)
        return record

    def commit(self, step: int, manifest: Manifest, *, fsync: bool) -> None:
        commit_step(self.step_where(step), manifest, fsync=fsync)
        if fsync:
            fsync_dir(self.root)

    def after_commit(self, manifest: Manifest) -> dict[str, Any]:
        return {}

    def retains(self, rank: int) -> bool:
        return rank == 0

    def retain(self, keeps: Callable[[int, int], bool]) -> None:
        done = self.committed()
        for step in retain_order(done, keeps):
            # The manifest goes first: a crash midway leaves an incomplete directory, never a
            # manifest that names deleted files.
            path = self.step_where(step)
            os.remove(os.path.join(path, MANIFEST_NAME))
            shutil.rmtree(path, ignore_errors=True)
        if done:
            remove_incomplete(self.root, keep_newer_than=done[-1])

    def read_manifest(self, step: int) -> Manifest:
        return load_manifest(self.step_where(step))

    def open_step(self, step: int, manifest: Manifest | None = None) -> StepDir:
        return StepDir(self.step_where(step), manifest)

    def restore_manifest(self, coord: Coordinator, step: int) -> Manifest:
        return self.read_manifest(step)

    def bring_files(self, coord: Coordinator, group: Any, manifest: Manifest, files: set[str]) -> list[str]:
        return []

    def inventory(self, rank: int) -> Any:
        return self.committed() if rank == 0 else []

    def restorable(self, gathered: Sequence[Any]) -> list[int]:
        return shared_restorable(gathered)

    def unservable(self, gathered: Sequence[Any]) -> dict[int, str]:
        return {}  # a damaged step is found when it is opened (and the restore falls back)


def remove_incomplete(root: str, *, keep_newer_than: int | None = None) -> list[str]:
    """Delete incomplete checkpoint directories (no manifest) under `root`; returns their paths.

    `keep_newer_than`: leave incomplete directories with a larger step alone (a save in flight).
    """
    removed = []
    for c in list_checkpoints(root):
        if c.complete or (keep_newer_than is not None and c.step > keep_newer_than):
            continue
        shutil.rmtree(c.path, ignore_errors=True)
        removed.append(c.path)
    return removed
