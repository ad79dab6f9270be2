"""Kill the calling process at an exact file-system operation: the Nth write, fsync, rename...

    install(CrashPoint(kind="replace", pattern=r"/persistent/.*/manifest\\.json$", n=2))

wraps the `os`, `shutil` and `builtins` functions that elastickit's writers use, counts the
operations whose path matches `pattern` (under `scope`), and SIGKILLs the process at the Nth:
before it runs, after it ran, or (for a write) with half of its bytes written. So the instants
that matter most, the manifest's rename (the commit) and the removals of retention, are hit for
sure, not only when a timer happens to land there.

The hooks live in the test process only (nothing in elastickit knows about them); they see every
operation of every thread of the process, the tier threads included. `from_env()` reads the same
spec from `EK_CRASH_AT` (JSON), for processes started by a launcher.

Kinds: open (a file opened for writing), write, fsync, replace (rename, the destination path),
unlink (os.remove/os.unlink), rmdir, rmtree, mkdir.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import signal
import threading
from dataclasses import asdict, dataclass
from typing import Any

KINDS = ("open", "write", "fsync", "replace", "unlink", "rmdir", "rmtree", "mkdir", "s3")
WHENS = ("before", "after", "half")


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashPoint:
    """Where to die.

    Attributes:
        kind: the operation (see KINDS).
        pattern: a regular expression searched in the operation's absolute path.
        n: die at the nth matching operation (1-based).
        when: "before" the operation, "after" it, or "half" (a write: half its bytes, then die).
        scope: only paths under this directory count ("" = every path).
    """

    kind: str
    pattern: str = ""
    n: int = 1
    when: str = "before"
    scope: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.when not in WHENS:
            raise ValueError(f"when must be one of {WHENS}, got {self.when!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CrashPoint:
        return cls(**json.loads(text))

    def describe(self) -> str:
        return f"{self.when} {self.kind} #{self.n} of {self.pattern or 'any path'}"


class _Hook:
    def __init__(self, point: CrashPoint, log_path: str | None) -> None:
        self.point = point
        self.rx = re.compile(point.pattern)
        self.scope = os.path.abspath(point.scope) if point.scope else ""
        self.count = 0
        self.lock = threading.Lock()
        self.log_path = log_path
        self.armed = True

    def matches(self, kind: str, path: str) -> bool:
        if kind != self.point.kind:
            return False
        if self.scope and not path.startswith(self.scope + os.sep):
            return False
        return self.rx.search(path) is not None

    def hit(self, kind: str, path: str) -> bool:
        """Count the operation; True when it is the one to die at."""
        if not self.armed or not self.matches(kind, path):
            return False
        with self.lock:
            self.count += 1
            return self.count == self.point.n

    def die(self, kind: str, path: str) -> None:
        if self.log_path:
            # The parent learns what was hit: written with a raw syscall, durable enough for a kill.
            fd = _ORIG["os.open"](self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _ORIG["os.write"](
                fd, json.dumps({"kind": kind, "path": path, "when": self.point.when}).encode()
            )
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


_ORIG: dict[str, Any] = {}
_HOOK: _Hook | None = None


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _abs(path: Any, dir_fd: int | None = None) -> str:
    if isinstance(path, int):
        return _fd_path(path)
    p = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(p):
        return os.path.join(_fd_path(dir_fd), p)
    return os.path.abspath(p)


def _around(kind: str, path: str, run: Any) -> Any:
    hook = _HOOK
    if hook is None or not hook.hit(kind, path):
        return run()
    if hook.point.when == "before":
        hook.die(kind, path)
    out = run()
    hook.die(kind, path)
    return out


class _File:
    """A file opened for writing: each write is an operation."""

    def __init__(self, f: Any, path: str) -> None:
        self._f = f
        self._path = path

    def write(self, data: Any) -> int:
        hook = _HOOK
        if hook is not None and hook.hit("write", self._path):
            if hook.point.when == "before":
                hook.die("write", self._path)
            if hook.point.when == "half":
                self._f.write(data[: len(data) // 2])
                self._f.flush()
                hook.die("write", self._path)
            n = self._f.write(data)
            self._f.flush()
            hook.die("write", self._path)
            return n
        return self._f.write(data)

    def __enter__(self) -> _File:  # noqa: PYI034
        self._f.__enter__()
        return self

    def __exit__(self, *exc: object) -> Any:
        return self._f.__exit__(*exc)

    def __iter__(self) -> Any:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    if isinstance(file, int) or not _writes(mode):
        return _ORIG["open"](file, mode, *args, **kwargs)
    path = _abs(file)
    f = _around("open", path, lambda: _ORIG["open"](file, mode, *args, **kwargs))
    hook = _HOOK
    return _File(f, path) if hook is not None and hook.point.kind == "write" else f


def _os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    if not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        return _ORIG["os.open"](path, flags, mode, dir_fd=dir_fd)
    return _around(
        "open", _abs(path, dir_fd), lambda: _ORIG["os.open"](path, flags, mode, dir_fd=dir_fd)
    )


def _os_write(fd: int, data: Any) -> int:
    hook = _HOOK
    if hook is not None and hook.point.kind == "write":
        path = _fd_path(fd)
        if hook.hit("write", path):
            if hook.point.when == "before":
                hook.die("write", path)
            if hook.point.when == "half":
                _ORIG["os.write"](fd, bytes(memoryview(data)[: len(data) // 2]))
                hook.die("write", path)
            n = _ORIG["os.write"](fd, data)
            hook.die("write", path)
            return n
    return _ORIG["os.write"](fd, data)


def _fsync(fd: Any) -> None:
    f = fd if isinstance(fd, int) else fd.fileno()
    return _around("fsync", _fd_path(f), lambda: _ORIG["os.fsync"](fd))


def _replace_like(name: str) -> Any:
    def wrapped(
        src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None
    ) -> None:
        return _around(
            "replace",
            _abs(dst, dst_dir_fd),
            lambda: _ORIG[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd),
        )

    return wrapped


def _unlink_like(name: str) -> Any:
    def wrapped(path: Any, *, dir_fd: int | None = None) -> None:
        return _around("unlink", _abs(path, dir_fd), lambda: _ORIG[name](path, dir_fd=dir_fd))

    return wrapped


def _rmdir(path: Any, *, dir_fd: int | None = None) -> None:
    return _around("rmdir", _abs(path, dir_fd), lambda: _ORIG["os.rmdir"](path, dir_fd=dir_fd))


def _mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
    return _around(
        "mkdir", _abs(path, dir_fd), lambda: _ORIG["os.mkdir"](path, mode, dir_fd=dir_fd)
    )


def _rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
    return _around("rmtree", _abs(path), lambda: _ORIG["shutil.rmtree"](path, *args, **kwargs))


def arm() -> None:
    """Start counting operations (a point installed with armed=False); no-op without one."""
    if _HOOK is not None:
        _HOOK.armed = True


def install(point: CrashPoint, *, log_path: str | None = None, armed: bool = True) -> None:
    """Arm `point` in this process (once); `log_path` receives what was hit, as JSON.

    armed=False: operations are not counted until `arm()` (a job's restore is not its save).
    """
    global _HOOK
    if _HOOK is not None:
        raise RuntimeError("a crash point is already installed in this process")
    _ORIG.update(
        {
            "open": builtins.open,
            "os.open": os.open,
            "os.write": os.write,
            "os.fsync": os.fsync,
            "os.replace": os.replace,
            "os.rename": os.rename,
            "os.remove": os.remove,
            "os.unlink": os.unlink,
            "os.rmdir": os.rmdir,
            "os.mkdir": os.mkdir,
            "shutil.rmtree": shutil.rmtree,
        }
    )
    _HOOK = _Hook(point, log_path)
    _HOOK.armed = armed
    builtins.open = _open
    os.open = _os_open
    os.write = _os_write
    os.fsync = _fsync
    os.replace = _replace_like("os.replace")
    os.rename = _replace_like("os.rename")
    os.remove = _unlink_like("os.remove")
    os.unlink = _unlink_like("os.unlink")
    os.rmdir = _rmdir
    os.mkdir = _mkdir
    shutil.rmtree = _rmtree
    if point.kind == "s3":
        _install_s3()


def _install_s3() -> None:
    """Object-store requests as operations ("s3"), named `<request> <bucket>/<key>`: the
    elastickit upload's S3 calls (create/upload_part/complete_multipart_upload, put_object) and
    s3fs's pipe_file (the manifest PUT), rm_file and rm (retention)."""
    import s3fs
    from elastickit.checkpoint.storage import objio

    call = objio.S3Upload._call

    def _call(self: Any, method: str, **kwargs: Any) -> Any:
        return _around("s3", f"{method} {self._bucket}/{self._key}", lambda: call(self, method, **kwargs))

    objio.S3Upload._call = _call  # type: ignore[method-assign]

    def wrap_async(name: str) -> None:
        orig = getattr(s3fs.S3FileSystem, name)

        async def wrapped(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
            hook = _HOOK
            what = f"{name.lstrip('_')} {path}"
            if hook is None or not hook.hit("s3", what):
                return await orig(self, path, *args, **kwargs)
            if hook.point.when == "before":
                hook.die("s3", what)
            out = await orig(self, path, *args, **kwargs)
            hook.die("s3", what)
            return out

        setattr(s3fs.S3FileSystem, name, wrapped)

    for name in ("_pipe_file", "_rm_file", "_rm"):
        wrap_async(name)


def from_env(var: str = "EK_CRASH_AT") -> None:
    """Arm the crash point in `$EK_CRASH_AT` (JSON of a CrashPoint), if set."""
    text = os.environ.get(var)
    if text:
        install(CrashPoint.from_json(text), log_path=os.environ.get(var + "_LOG"))
