"""The rendezvous store: a TCPStore served by a process that is no node's.

torchrun hosts the c10d rendezvous store in one of the agents (the one whose address matches
`--rdzv-endpoint`), and killing that agent's node kills the job (ANCHORS.md). elastickit's
agents never host it (`is_host=false`); this process does:

    elastickit launch --store-only --rdzv-endpoint 0.0.0.0:29500     # on a machine that stays

or, on one machine, `elastickit launch` starts it on its own (detached, in its own session, so
that no node's death takes it down) when nothing answers at a local endpoint yet. The store
holds the torchrun rendezvous and elastickit's membership (heartbeats, plans) of every job that
uses it, each under its own prefix.

The server listens on an IPv4 socket of its own when the address is IPv4 (`master_store`):
c10d's libuv server names every connection it accepts with a reverse DNS lookup
(`getnameinfo`), inside its one event-loop thread. On a dual-stack listener an IPv4 peer
arrives as `::ffff:a.b.c.d`, which /etc/hosts never holds, so each accept asks the resolver, and
one lost DNS answer froze the whole store (every heartbeat, plan and connect of every node) for
the resolver's 5 s timeout: seen here in 2 of 3 recoveries from a hung node, whose survivors open
and break dozens of connections at once. An IPv4 peer is looked up as `a.b.c.d` (the loopback
and cluster hosts are in /etc/hosts).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

__all__ = ["master_store", "reachable", "serve", "spawn_detached"]


def master_store(host: str, port: int, *, timeout_s: float = 60.0) -> Any:
    """A TCPStore server (multi-tenant, not waiting for workers) at host:port (0: any free
    port); on an IPv4 socket of its own when `host` is an IPv4 address (see the module
    docstring), else c10d's own dual-stack listener."""
    import ipaddress

    import torch.distributed as dist

    kwargs: dict[str, Any] = {}
    try:
        v4 = isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        v4 = False
    if v4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(socket.SOMAXCONN)
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]
        kwargs["master_listen_fd"] = sock.detach()  # the server owns the descriptor now
    return dist.TCPStore(
        host, port, is_master=True, multi_tenant=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )


def reachable(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def serve(host: str, port: int, *, run_id: str | None = None, grace_s: float = 10.0) -> int:
    """Serve the store until interrupted, or (with `run_id`) until that job is done."""
    store = master_store(host, port)
    print(f"elastickit: rendezvous store serving on {host}:{store.port} (pid {os.getpid()})", flush=True)
    done_key = f"ek/{run_id}/done" if run_id else None
    try:
        while True:
            time.sleep(1.0)
            if done_key is not None and store.check([done_key]):
                time.sleep(grace_s)  # the last agents read the rendezvous on their way out
                return 0
    except KeyboardInterrupt:
        return 0


def spawn_detached(host: str, port: int, run_id: str, *, python: str = sys.executable, wait_s: float = 30.0) -> int:
    """Start `serve` in its own session on this machine; return its pid once it answers."""
    proc = subprocess.Popen(
        [python, "-m", "elastickit.elastic.store", host, str(port), run_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + wait_s
    while not reachable(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise OSError(f"could not start a rendezvous store on {host}:{port}")
        time.sleep(0.1)
    return proc.pid


if __name__ == "__main__":
    _host, _port = sys.argv[1], int(sys.argv[2])
    sys.exit(serve(_host, _port, run_id=sys.argv[3] if len(sys.argv) > 3 else None))
