"""Where `convert` and `reshard` write: a new directory, never the source, committed at once.

A destination must be new (absent, or an empty directory). It must not be the source, lie
inside it, or lie inside the run root that holds a source step directory; paths are compared
after resolving symlinks, so a link cannot sneak the output into the source.

Everything is written into a hidden sibling `.<name>.partial-<pid>-<random>` and renamed onto
the destination only when complete (every file fsynced first, the parent fsynced after). A crash
at any instant leaves either no destination or a complete one; the next run into the same
parent removes the partial folders of processes that are gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from elastickit.checkpoint.errors import DataError, RequestError
from elastickit.checkpoint.format.integrity import fsync_dir, fsync_file
from elastickit.checkpoint.format.manifest import STEP_DIR_RE

PARTIAL = ".partial-"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def protected(src: str) -> list[str]:
    """The real paths a conversion of `src` must not write into: the source, and the run root
    around a source step directory (a new folder there would pose as a step of that run)."""
    real = os.path.realpath(src)
    out = [real]
    if STEP_DIR_RE.match(os.path.basename(real)):
        out.append(os.path.dirname(real))
    return out


def check_destination(src: str | list[str], dst: str) -> str:
    """The real path to write `dst` at, or RequestError saying why it cannot be the output of
    a conversion of `src` (one path, or several: e.g. a root and the step resolved in it)."""
    if not dst or not dst.strip():
        raise RequestError("the destination DST is empty; name a new directory", path=dst)
    final = os.path.realpath(dst)
    for s in [src] if isinstance(src, str) else src:
        source, *root = protected(s)
        if final == source:
            raise RequestError(
                f"{dst} is the source {s} itself; write to a new directory "
                "(the source is never modified)",
                path=dst,
            )
        if _inside(final, source):
            raise RequestError(
                f"{dst} lies inside the source {s}; write to a new directory outside it", path=dst
            )
        if root and _inside(final, root[0]):
            raise RequestError(
                f"{dst} lies in the run root {root[0]} of the source {s}, where it would pose as "
                "one of its checkpoints; write to a new directory outside it",
                path=dst,
            )
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise RequestError(
            f"{dst} exists and is not a directory; choose a new destination", path=dst
        )
    if os.path.isdir(final) and os.listdir(final):
        raise RequestError(f"{dst} exists and is not empty; choose a new destination", path=dst)
    return final


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: str, name: str) -> None:
    """Partial outputs of `name` left by processes that no longer run (a crash mid-write)."""
    prefix = f".{name}{PARTIAL}"
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for e in entries:
        if not e.startswith(prefix):
            continue
        pid = e[len(prefix) :].partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, e), ignore_errors=True)


def _fsync_tree(root: str) -> None:
    for d, _, files in os.walk(root, topdown=False):
        for f in files:
            fsync_file(os.path.join(d, f))
        fsync_dir(d)


@contextmanager
def staged_output(src: str | list[str], dst: str, *, fsync: bool = True) -> Iterator[str]:
    """Yield a fresh hidden folder next to `dst`; on a clean exit it becomes `dst` (renamed at
    once), on an error it is removed. `dst` is checked against `src` first (`check_destination`)."""
    final = check_destination(src, dst)
    parent, name = os.path.split(final)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale(parent, name)
        tmp = tempfile.mkdtemp(prefix=f".{name}{PARTIAL}{os.getpid()}-", dir=parent)
    except OSError as e:
        raise RequestError(
            f"cannot create {dst} ({e.strerror or e}); choose a destination you can write to",
            path=dst,
        ) from e
    try:
        try:
            yield tmp
            if fsync:
                _fsync_tree(tmp)
        except OSError as e:
            raise DataError(
                f"writing {dst} failed ({e.strerror or e}: {e.filename or tmp}); nothing was "
                "written under that name",
                path=dst,
            ) from e
        try:
            os.rename(tmp, final)  # replaces an empty directory; fails on a non-empty one
        except OSError as e:
            raise RequestError(
                f"{dst} changed while it was written ({e.strerror}); choose a new destination",
                path=dst,
            ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_dir(parent)
