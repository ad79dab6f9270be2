"""The one rule for the paths elastickit is given: local paths only (for now), `~` expanded.

Every path a user hands to elastickit (the Checkpointer root, a tier's path, the CLI's
checkpoint arguments) goes through `local_path` first. Without it, `gs://bucket/x` is a relative
path to the operating system, and a checkpoint meant for object storage lands in
`./gs:/bucket/x` with no error at all. URLs are refused until a storage backend for their
scheme exists.

`writable_dir` is the check to run before work starts: it creates the directory and proves it
writable with a probe file, so that a read-only or misnamed target fails with one sentence at
construction (or before a launch), not after hours of training.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile

from .errors import RequestError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def local_path(path: str | os.PathLike[str], *, what: str = "path") -> str:
    """`path` as a local filesystem path, with `~` expanded; refuses URLs (`scheme://...`).

    `what` names the argument in the error (e.g. "the Checkpointer root", "SRC", "--ckpt").
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise RequestError(f"{what} must be a text path, got bytes {text!r}")
    m = _SCHEME.match(text)
    if m:
        raise RequestError(
            f"{what} {text!r} is a {m.group(1)}:// URL, which elastickit cannot write or read yet "
            "(only local paths); give a local directory, or mount the storage and give its mount point",
            path=text,
        )
    if not text:
        raise RequestError(f"{what} is empty; give a directory")
    return os.path.expanduser(text)


def writable_dir(path: str, *, what: str = "directory") -> None:
    """Create `path` (and its parents) if needed and prove it writable, or raise RequestError.

    The proof is a probe file created and removed in `path`: `os.access` says yes to root on
    any mode and cannot see a read-only mount's other limits.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise RequestError(f"{what} {path} is a file, not a directory; give a directory", path=path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ek-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError) as e:
        raise RequestError(
            f"{what} {path} cannot be created: {_file_above(path)} is a file, not a directory; "
            "give another path",
            path=path,
        ) from e
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "choose a writable directory or fix its permissions"
        else:
            fix = "fix it or choose another directory"
        raise RequestError(f"{what} {path} is not writable ({why}); {fix}", path=path) from e


def _file_above(path: str) -> str:
    """The nearest existing ancestor of `path` that is not a directory (what blocked makedirs)."""
    p = os.path.abspath(path)
    while p != os.path.dirname(p):
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
        p = os.path.dirname(p)
    return path
