"""One writer job per checkpoint root: an OS lock on a file in the root.

Two jobs saving to one root interleave their steps, and one's step 30 replaces the other's. The
writer takes a POSIX record lock (`lockf`, F_SETLK) on `<root>/.elastickit.lock` for its
lifetime and writes who holds it (host, pid, since when) into the file, so a second writer is
refused with one sentence naming the holder. The lock is the kernel's: it goes with the holder
process, so a job that was killed never blocks its restart with a stale lock (the file's
contents, which outlive the lock, are read only to name a live holder).

Why record locks rather than flock: they belong to the process, so a child forked while the lock
is held (a DataLoader worker) does not inherit it and cannot keep the root locked after the
holder died; and NFS serves them natively. Their catch is that closing any descriptor of the
file drops the process's lock, so each process opens the file once per root and counts its
holders (several Checkpointers of one process may share a root, as they always could; the lock
is against other processes). On filesystems without locks (some Lustre mounts) the writer goes
on unlocked, saying so once.

One holder is let through: a worker of an earlier incarnation of the same elastic job (the
same `TORCHELASTIC_RUN_ID`, which torchrun gives every worker of one job) that is still alive
because its node hangs or was stopped. torchrun has given up on it and restarted the job
elsewhere; it cannot commit a checkpoint without its peers, which are gone, and refusing would
stop the recovery this library exists for. The new incarnation goes on unlocked, saying so.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time

from .errors import RequestError

log = logging.getLogger("elastickit")

LOCK_NAME = ".elastickit.lock"

_guard = threading.Lock()
_held: dict[str, list[int]] = {}  # real path of a lock file -> [descriptor, holders in this process]


def _forget_in_child() -> None:
    """A forked child holds none of its parent's record locks: it starts with no holds (closing
    its copies of the descriptors drops only locks of its own, of which it has none)."""
    global _guard
    _guard = threading.Lock()  # another thread may have held it at the fork
    for fd, _count in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RootLock:
    """This process's hold on the writer lock of one checkpoint root (see the module docstring).

    Attributes:
        path: the lock file.
        locked: False when the filesystem does not support locks (the writer goes on unlocked).
    """

    def __init__(self, path: str, *, locked: bool) -> None:
        self.path = path
        self.locked = locked
        self._held = locked

    @classmethod
    def acquire(cls, root: str) -> RootLock:
        """Hold the lock of `root` (an existing, writable directory) or raise RequestError
        naming the process that holds it."""
        path = os.path.realpath(os.path.join(root, LOCK_NAME))
        with _guard:
            entry = _held.get(path)
            if entry is not None:
                entry[1] += 1
                return cls(path, locked=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                found = _read_holder(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else None
                os.close(fd)
                job = os.environ.get("TORCHELASTIC_RUN_ID", "")
                if found is not None and job not in ("", "none") and found.get("job") == job:
                    log.warning(
                        "elastickit: the checkpoint root %s is still held by %s, a worker of an earlier "
                        "incarnation of this job (TORCHELASTIC_RUN_ID=%s) that torchrun gave up on; "
                        "going on without the lock (that worker cannot commit without its peers)",
                        root,
                        _describe(found),
                        job,
                    )
                    return cls(path, locked=False)
                if found is not None:
                    holder = _describe(found)
                    raise RequestError(
                        f"the checkpoint root {root} is in use by {holder}: two writers on one root "
                        "interleave their checkpoints; stop that writer, or give this job another root",
                        path=root,
                    ) from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    log.warning(
                        "elastickit: %s does not support file locks (%s); nothing stops a second "
                        "job from writing this root at the same time",
                        root,
                        e.strerror,
                    )
                    return cls(path, locked=False)
                raise
            record = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": time.time(),
                "job": os.environ.get("TORCHELASTIC_RUN_ID", ""),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            _held[path] = [fd, 1]
            return cls(path, locked=True)

    def release(self) -> None:
        """Give this hold back (idempotent); the last one in the process unlocks. The file
        stays: removing it would let a writer that opened it a moment earlier lock a file that
        no later writer sees."""
        with _guard:
            if not self._held:
                return
            self._held = False
            entry = _held[self.path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self.path]
                os.close(entry[0])  # closing the process's descriptor drops its record lock


def _read_holder(fd: int) -> dict[str, object]:
    try:
        out = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, object]) -> str:
    """'pid 42 on host h, since 2025-01-01 10:00:00' (what the holder wrote into the file)."""
    pid, host, since = holder.get("pid"), holder.get("host"), holder.get("since")
    if pid is None:
        return "another process (it has not written who it is yet)"
    when = ""
    if isinstance(since, int | float):
        when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    return f"pid {pid} on host {host}{when}"
