"""The one rule for the paths elastickit is given: a local path (`~` expanded, `file://`
accepted) or, where object storage is supported, a URL whose fsspec backend is installed.

Every path a user hands to elastickit (the Checkpointer root, a tier's path, the CLI's
checkpoint arguments) goes through `location` (object storage allowed: the persistent tier, the
CLI's SRC and DST) or `local_path` (node-local things: the memory and local tiers, the event
log, the trainer's --ckpt). Without them, `gs://bucket/x` is a relative path to the operating
system, and a checkpoint meant for object storage lands in `./gs:/bucket/x` with no error at
all. A URL whose scheme has no installed backend is refused with one sentence naming the
package to install; where only local paths make sense, a URL is refused saying so.

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


def is_url(path: str) -> bool:
    """Whether `path` is a `scheme://...` URL of object storage (not `file://`)."""
    m = _SCHEME.match(path)
    return m is not None and m.group(1).lower() not in _LOCAL_SCHEMES


def local_path(path: str | os.PathLike[str], *, what: str = "path") -> str:
    """`path` as a local filesystem path, with `~` expanded and `file://` taken off; refuses
    other URLs (`scheme://...`) with one sentence.

    `what` names the argument in the error (e.g. "the Checkpointer root", "SRC", "--ckpt").
    """
    text = _text(path, what)
    m = _SCHEME.match(text)
    if m and m.group(1).lower() not in _LOCAL_SCHEMES:
        raise RequestError(
            f"{what} {text!r} is a {m.group(1)}:// URL, but {what} must be a local path (object "
            "storage holds the persistent tier, not this); give a local directory",
            path=text,
        )
    return _local(text, what)


def location(path: str | os.PathLike[str], *, what: str = "path") -> str:
    """`path` as a local path (see `local_path`) or an object-storage URL whose fsspec backend
    is installed (returned as given, less a trailing `/`); a URL without one is refused with one
    sentence naming the package to install."""
    text = _text(path, what)
    if not is_url(text):
        return local_path(text, what=what)
    from .storage.objstore import open_filesystem  # fsspec is optional: only URLs need it

    open_filesystem(text, what=what)
    return text.rstrip("/")


_LOCAL_SCHEMES = ("file", "local")


def _text(path: str | os.PathLike[str], what: str) -> str:
    text = os.fspath(path)
    if not isinstance(text, str):
        raise RequestError(f"{what} must be a text path, got bytes {text!r}")
    if not text:
        raise RequestError(f"{what} is empty; give a directory")
    if "\x00" in text:  # the OS refuses it with a ValueError, not an OSError
        raise RequestError(f"{what} {text!r} holds a NUL character, which no file name can", path=text)
    return text


def _local(text: str, what: str) -> str:
    m = _SCHEME.match(text)
    if m:  # file:///abs/path or file://localhost/abs/path
        rest = text[m.end() :]
        host, _, tail = rest.partition("/")
        if host not in ("", "localhost"):
            raise RequestError(f"{what} {text!r} names host {host!r}; a file:// URL must be file:///absolute/path", path=text)
        text = "/" + tail
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
