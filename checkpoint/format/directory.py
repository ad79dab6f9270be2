"""Checkpoints as directories (DESIGN.md section 2): finding, opening and verifying them.

A directory `step-<8 digits>` with `manifest.json` is a committed checkpoint; without it, an
incomplete one, which readers never load and garbage collection removes. Everything here reads;
writing and deleting belong to the tiers (`checkpoint.storage`).

`StepDir` is one committed step directory as readers take it: its manifest, and its files
opened by name (memory-mapped, checksums verified). The resharding executor reads any step
through that shape, so a step held elsewhere (an object store) reads the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import CorruptCheckpointError, IncompleteCheckpointError, RequestError
from .manifest import MANIFEST_NAME, STEP_DIR_RE, FileRecord, Manifest
from .stfile import StFile


RUN_FILE = ".elastickit-run"
"""The marker a checkpoint root keeps with its run's key (see `checkpoint.runs`)."""

@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """A checkpoint directory found under a root.

    Attributes:
        step: the step in its name.
        path: the directory.
        complete: whether it has a committed manifest.
    """

    step: int
    path: str
    complete: bool


def list_checkpoints(root: str) -> list[CheckpointInfo]:
    """Every `step-*` directory under `root`, oldest first (an absent root has none)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise RequestError(f"{root} is a file, not a checkpoint root directory", path=root) from None
    out = []
    for name in names:
        m = STEP_DIR_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path):
            out.append(
                CheckpointInfo(
                    step=int(m.group(1)),
                    path=path,
                    complete=os.path.isfile(os.path.join(path, MANIFEST_NAME)),
                )
            )
    return sorted(out, key=lambda c: c.step)


def is_checkpoint_dir(path: str) -> bool:
    """Whether `path` is one checkpoint (has a manifest), as opposed to a root of several."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def read_manifest_text(mpath: str) -> str:
    """The text of the manifest file `mpath`; a file that is not UTF-8 is corrupt (raises
    CorruptCheckpointError naming it). FileNotFoundError passes through."""
    with open(mpath, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(
            f"{mpath} is not valid UTF-8 (byte {e.start}); it is corrupt, restore an earlier checkpoint",
            path=mpath,
        ) from None


def load_manifest(path: str) -> Manifest:
    """The manifest of the checkpoint directory `path`; refuses incomplete or foreign ones."""
    if not os.path.isdir(path):
        raise RequestError(f"{path} does not exist or is not a directory", path=path)
    mpath = os.path.join(path, MANIFEST_NAME)
    try:
        text = read_manifest_text(mpath)
    except FileNotFoundError:
        raise IncompleteCheckpointError(
            f"{path} has no {MANIFEST_NAME}: the save never committed, so it cannot be loaded; "
            "restore an earlier checkpoint",
            path=path,
        ) from None
    return Manifest.loads(text, source=mpath)


class StepDir:
    """One committed checkpoint directory, as readers take it.

    Attributes:
        path: the step directory.
        manifest: its manifest (read on construction unless given).
        where: what messages call it (the path).
    """

    def __init__(self, path: str, manifest: Manifest | None = None) -> None:
        self.path = path
        self.where = path
        self.manifest = manifest if manifest is not None else load_manifest(path)

    def open(self, name: str, record: FileRecord, *, verify: bool = True) -> StFile:
        """File `name` of this step, memory-mapped; each tensor verified on first access."""
        return StFile(os.path.join(self.path, name), record, verify=verify)


def resolve(path: str) -> str:
    """A checkpoint directory from either a checkpoint directory or a root (its latest one)."""
    if is_checkpoint_dir(path) or STEP_DIR_RE.match(os.path.basename(os.path.normpath(path))):
        return path
    done = [c for c in list_checkpoints(path) if c.complete]
    if done:
        return done[-1].path
    if os.path.isdir(path):
        raise IncompleteCheckpointError(
            f"{path} holds no committed checkpoint (no step-*/manifest.json)", path=path
        )
    raise RequestError(f"{path} does not exist", path=path)


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One integrity problem: the file, the logical tensors it holds, and what is wrong."""

    file: str
    tensors: tuple[str, ...]
    reason: str


def verify_checkpoint(path: str) -> list[Problem]:
    """Check every byte of every file of the checkpoint at `path` against the manifest.

    Returns the problems sorted by file; empty when the checkpoint is intact. Raises for a
    missing or unreadable manifest (which is itself the problem).
    """
    step = StepDir(path)
    manifest = step.manifest
    problems: list[Problem] = []
    for name, rec in sorted(manifest.files.items()):
        fpath = os.path.join(path, name)
        held = tuple(manifest.tensors_in_file(name))
        try:
            with step.open(name, rec) as f:
                bad_keys = f.verify_all()
        except CorruptCheckpointError as e:
            problems.append(Problem(file=fpath, tensors=held, reason=str(e)))
            continue
        if bad_keys:
            hit = tuple(
                sorted(
                    t.name
                    for t in manifest.tensors.values()
                    if any(s.file == name and s.key in bad_keys for s in t.shards)
                )
            )
            problems.append(
                Problem(
                    file=fpath,
                    tensors=hit,
                    reason=f"{fpath}: {len(bad_keys)} stored tensor(s) do not match their checksums",
                )
            )
    return problems
