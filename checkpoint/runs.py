"""Which run a checkpoint belongs to: claiming a root, and keying node-local tiers by run.

A node-local tier path such as `/dev/shm/ek/{node}` is shared by every job on the node that uses
the same configuration. Its checkpoints must only ever be offered to the run that wrote them:
job B on a fresh root must never resume job A's step 5. So each run writes node-local
checkpoints under `<local path>/run-<key>/`, where the key identifies the run:

- the run id, a random id kept in the persistent root (`<root>/.elastickit-run`), created by the
  first writer: a restart on the same root has the same id and resumes from the local tier; a
  root that was deleted and made again is a new run, whose key differs;
- the root's real path: a copy of a root (`cp -r A B`) carries A's run id but is another run.

Each run directory says whose it is (`run.json`: key and root), so that directories of earlier
runs of the same root (deleted and made again) are removed when the root is claimed: no later run
can ever read them, and node-local storage is often memory.

Claiming (`claim_root`, rank 0, for the writer's lifetime) also refuses what is not a root (a
file, a checkpoint directory), checks that the root is writable and takes the root's writer lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .coord import Coordinator
from .errors import RequestError
from .format.directory import RUN_FILE
from .format.integrity import atomic_write
from .format.manifest import MANIFEST_NAME, STEP_DIR_RE, step_dir_name
from .lock import RootLock
from .paths import is_url, writable_dir

RUN_INFO = "run.json"


def refuse_checkpoint_dir(root: str) -> None:
    """Raise RequestError if `root` is one checkpoint (a step directory) rather than a root."""
    name = os.path.basename(os.path.normpath(root))
    has_manifest = os.path.isfile(os.path.join(root, MANIFEST_NAME))
    if not has_manifest and not (STEP_DIR_RE.match(name) and os.path.isdir(root)):
        return
    step = _step_of(root, name)
    parent = os.path.dirname(os.path.normpath(root)) or "."
    if STEP_DIR_RE.match(name):
        fix = f"give its root {parent} (and restore(step={step}) to resume from this step)"
    else:
        fix = (
            f"to train from it, move it into a root of its own as {step_dir_name(step)} "
            f"(mkdir ROOT && mv {root} ROOT/{step_dir_name(step)}) and give ROOT"
        )
    raise RequestError(
        f"{root} is one checkpoint (step {step}), not a checkpoint root that holds step-* "
        f"directories; {fix}",
        path=root,
    )


def _step_of(root: str, name: str) -> int:
    m = STEP_DIR_RE.match(name)
    if m:
        return int(m.group(1))
    try:
        with open(os.path.join(root, MANIFEST_NAME), encoding="utf-8") as f:
            return int(json.load(f).get("step", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def run_key(root: str) -> str:
    """The key of the run whose checkpoints `root` holds (created with its run id if new)."""
    path = os.path.join(root, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            run_id = str(json.load(f)["run_id"])
    except FileNotFoundError:
        run_id = os.urandom(8).hex()
        atomic_write(path, json.dumps({"run_id": run_id, "created_s": time.time()}) + "\n")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RequestError(
            f"{path} is unreadable ({e}); it names this root's run: restore it, or remove it to "
            "start a new run (node-local checkpoints of the old one are then ignored)",
            path=path,
        ) from e
    return _key(run_id, root)


def _key(run_id: str, root: str) -> str:
    return hashlib.sha256(f"{run_id}\0{os.path.realpath(root)}".encode()).hexdigest()[:16]


def existing_run_key(root: str) -> str | None:
    """The key of the run whose checkpoints `root` holds, without creating anything: None when
    the root names no run (yet) or its run file is unreadable. For readers (the dashboard)."""
    try:
        with open(os.path.join(root, RUN_FILE), encoding="utf-8") as f:
            return _key(str(json.load(f)["run_id"]), root)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_run_dirs(base: str) -> dict[str, str]:
    """The run directories in node-local tier directory `base`: path -> the root its `run.json`
    names ("" when unreadable)."""
    out: dict[str, str] = {}
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        path = os.path.join(base, name)
        if not name.startswith("run-") or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, RUN_INFO), encoding="utf-8") as f:
                out[path] = str(json.load(f).get("root", ""))
        except (OSError, ValueError, AttributeError):
            out[path] = ""
    return out


@dataclass(slots=True)
class RootClaim:
    """What the writer holds while it lives: the run key and the writer locks of its roots."""

    key: str
    anchor: str  # the root the run id lives in (its real path): the persistent tier's, else the root
    locks: Sequence[Any] = ()  # RootLock (a file root) or objclaim.Lease (an object root)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = ()


def claim_root(
    root: str,
    *,
    persistent: str | None,
    events_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> RootClaim:
    """Claim `root` for one writer (rank 0): refuse a checkpoint directory or a file, check that
    `root`, the persistent tier's directory and `events_dir` are writable, lock the root (and the
    persistent tier's directory when it is elsewhere), and read or create the run id.

    The run id lives in the persistent tier's directory (the root unless the tier has a path of
    its own): that is where the run's durable checkpoints are, so it is what a run is. An
    object-storage URL is claimed by `objclaim.claim_object_root` (a probe, a writer lease, its
    run id) with `storage_options`."""
    dirs = [root] if persistent is None or _same(persistent, root) else [root, persistent]
    files = [d for d in dirs if not is_url(d)]
    for d in files:
        refuse_checkpoint_dir(d)
    for d in files:
        writable_dir(d, what="the checkpoint root" if d == root else "the persistent tier path")
    if events_dir and not any(_same(events_dir, d) for d in dirs):
        writable_dir(events_dir, what="the events directory")
    anchor = dirs[-1]
    locks: list[Any] = []
    key = ""
    try:
        for d in dirs:
            if is_url(d):
                from .storage.objclaim import (
                    claim_object_root,  # fsspec is optional: only URLs need it
                )
                from .storage.objstore import ObjectRoot

                claim = claim_object_root(ObjectRoot(d, storage_options))
                locks.append(claim.lease)
                key = claim.key if d == anchor else key
            else:
                locks.append(RootLock.acquire(d))
        if not is_url(anchor):
            key = run_key(anchor)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return RootClaim(key=key, anchor=anchor if is_url(anchor) else os.path.realpath(anchor), locks=locks)


def _same(a: str, b: str) -> bool:
    if is_url(a) or is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def local_run_dir(base: str, key: str, anchor: str) -> str:
    """This run's directory in the node-local tier directory `base`, made and labelled.

    Directories of earlier runs of the same root (`anchor`) are removed: that root now names
    another run, so nothing can read them any more. The caller holds the root's lock, so no
    live writer uses them."""
    mine = os.path.join(base, f"run-{key}")
    os.makedirs(mine, exist_ok=True)
    info = os.path.join(mine, RUN_INFO)
    if not os.path.exists(info):  # ranks sharing a node label it at once: each renames its own
        atomic_write(info, json.dumps({"key": key, "root": anchor}), fsync=False)
    for name in os.listdir(base):
        other = os.path.join(base, name)
        if name == f"run-{key}" or not name.startswith("run-"):
            continue
        try:
            with open(os.path.join(other, RUN_INFO), encoding="utf-8") as f:
                owner = json.load(f).get("root")
        except (OSError, ValueError, AttributeError):
            continue  # not ours to judge
        if owner == anchor:
            shutil.rmtree(other, ignore_errors=True)
    return mine


def join_run(coord: Coordinator, first: dict[str, str], *, persistent: str | None, local_base: str | None) -> str:
    """Every rank, once, in order, with rank 0's claim (`{"key", "anchor"}` or `{"error"}`):
    check the directories this rank writes, and raise the same RequestError on every rank if
    rank 0's claim or any rank's check failed. Returns this rank's local run directory ("" when
    there is no local tier)."""
    if "error" in first:
        raise RequestError(first["error"])
    error, mine = None, ""
    try:
        if persistent is not None and coord.rank != 0 and not is_url(persistent):  # every rank writes its file there
            writable_dir(persistent, what="the persistent tier path")
        if local_base is not None:
            writable_dir(local_base, what="the local tier path")
            mine = local_run_dir(local_base, first["key"], first["anchor"])
    except RequestError as e:
        error = str(e)
    except OSError as e:
        error = f"the local tier path {local_base} is not usable ({e})"
    got = coord.all_gather(error, phase="checkpoint directories")
    failed = [(r, e) for r, e in enumerate(got) if e]
    if failed:
        rank, cause = failed[0]
        raise RequestError(cause if coord.world_size == 1 else f"rank {rank}: {cause}")
    return mine
