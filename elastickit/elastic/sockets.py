"""Waking a thread blocked in a gloo collective whose peer is dead or hung (Linux).

gloo's `ProcessGroup.abort()` returns at once but does not wake an operation already waiting
for a peer (seen here: the pending recv ran into its 60 s timeout anyway). What wakes it is the
transport noticing its connection is gone: `shutdown(2)` on this process's end of every
connection the process group opened makes the blocked read fail in about a millisecond with
"Connection closed by peer", on this rank and on the peers at the other end.

`SocketTracker` records which sockets a generation of process groups opened (the ones that
appeared while the groups were built, store clients of that generation included) and shuts
exactly those down; the process's own long-lived store clients and anything opened before are
left alone. The descriptors are not closed (gloo still owns them); only the connections end.
Listening sockets are left alone too: gloo's listener thread aborts the whole process when
`accept` fails.
"""

from __future__ import annotations

import os
import socket
import threading

__all__ = ["SocketTracker", "open_sockets"]


def open_sockets() -> dict[int, int]:
    """fd -> socket inode of every socket this process holds."""
    out = {}
    base = "/proc/self/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            out[int(name)] = int(target[8:-1])
    return out


class SocketTracker:
    """The connections one generation of process groups opened, and their shutdown.

    Between `start()` and `stop()` every socket that appears belongs to the generation (a
    `shutdown()` meanwhile, from another thread, takes the ones open at that moment: a group
    still connecting is woken too); `stop()` freezes the set once the groups are built.
    """

    def __init__(self) -> None:
        self._before: set[int] | None = None  # inodes open before start()
        self.owned: dict[int, int] = {}  # fd -> inode, frozen by stop()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Call before building the generation's groups."""
        with self._lock:
            self._before = set(open_sockets().values())

    def _mine(self) -> dict[int, int]:
        if self._before is None:
            return dict(self.owned)
        now = open_sockets()
        return {**self.owned, **{fd: ino for fd, ino in now.items() if ino not in self._before}}

    def stop(self) -> None:
        """Call once they are built: every socket that appeared since `start` is theirs."""
        with self._lock:
            if self._before is None:
                raise RuntimeError("SocketTracker.stop() without start()")
            self.owned = self._mine()
            self._before = None

    def shutdown(self) -> int:
        """Shut down every connection still open among the generation's; returns how many."""
        with self._lock:
            mine = self._mine()
        n = 0
        current = open_sockets()
        for fd, ino in mine.items():
            if current.get(fd) != ino:
                continue  # closed, or the number reused for another socket: not ours any more
            try:
                sk = socket.socket(fileno=fd)
            except OSError:
                continue
            try:
                if sk.type == socket.SOCK_STREAM:
                    # Never a listener: gloo's accept thread aborts the process on EINVAL.
                    sk.getpeername()
                    sk.shutdown(socket.SHUT_RDWR)
                    n += 1
            except OSError:
                pass  # not connected (a listener) or already shut
            finally:
                sk.detach()  # gloo still owns the descriptor
        return n
