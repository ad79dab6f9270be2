"""One node's agent: torchrun's elastic agent, set up for in-process recovery.

    python -m elastickit.elastic.agent --nnodes 2:4 --nproc-per-node 1 \\
        --rdzv-endpoint 127.0.0.1:29500 --rdzv-id job1 -- --run runs/job1 --steps 200

(`elastickit launch` is the same with the CLI's checks in front.) It is torchrun's own
`LocalElasticAgent` over a c10d rendezvous, with these changes:

- the rendezvous store is not hosted by any agent (`is_host=false`): a separate store process
  serves it (`elastickit.elastic.store`), so losing any node never loses the store;
- fast settings by default (ANCHORS.md, "Losing a node under torchrun elastic"):
  `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`, `last_call_timeout=1`, `keep_alive_interval=1`,
  `keep_alive_max_attempt=3`, each overridable with `--rdzv-conf`;
- when a node waits to join while this node's workers are healthy, torchrun would stop and
  restart every worker at the larger world. Here the agent joins the next rendezvous round with
  its workers left running (they grow in-process: `elastickit.elastic.runtime`); the joining
  node's agent completes the round and starts its workers, which register as joiners. Workers
  that exit are restarted by torchrun as always (`--max-restarts`), and rejoin the same way.
  The exit barrier is skipped: the workers agree on the end of training among themselves;
- the workers' c10d C++ log level is ERROR unless TORCH_CPP_LOG_LEVEL says otherwise: the
  warnings of the connections the runtime shuts down on purpose cost a reverse DNS lookup each
  (`run_agent`).

Workers get the rendezvous store's address (ELASTICKIT_STORE), the run id, the node's name, the
agent's pid (they arm PR_SET_PDEATHSIG against it, so they die with their agent) and the node-local
tier's directory (ELASTICKIT_LOCAL_TIER, default /dev/shm/elastickit/<run id>/<node>). Agents that
share a machine need distinct `--node` names (the default is the host name).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import tempfile
from collections.abc import Sequence

from elastickit.checkpoint.errors import RequestError

__all__ = ["FAST_RDZV", "AgentRequest", "build_parser", "main", "run_agent"]

FAST_RDZV = {
    "last_call_timeout": "1",
    "keep_alive_interval": "1",
    "keep_alive_max_attempt": "3",
    "join_timeout": "600",
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AgentRequest:
    """One node's agent."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    rdzv_endpoint: str
    """HOST:PORT of the rendezvous store (a store process outside the nodes)."""
    rdzv_id: str = "elastickit"
    max_restarts: int = 3
    node: str = ""
    """This node's name (default: the host name)."""
    local_addr: str | None = None
    rdzv_conf: tuple[tuple[str, str], ...] = ()
    """Overrides of the rendezvous settings (key, value)."""
    monitor_interval_s: float = 0.1
    worker_args: tuple[str, ...] = ()
    """Flags of `python -m elastickit.elastic.worker`."""
    worker_module: str = "elastickit.elastic.worker"

    def check(self) -> None:
        """RequestError for anything that would fail after launch."""
        if not 1 <= self.min_nodes <= self.max_nodes:
            raise RequestError(
                f"--nnodes {self.min_nodes}:{self.max_nodes} must be MIN:MAX with 1 <= MIN <= MAX"
            )
        if self.nproc_per_node < 1:
            raise RequestError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise RequestError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RequestError(
                f"--rdzv-endpoint {self.rdzv_endpoint!r} is not HOST:PORT (e.g. 10.0.0.1:29500)"
            )
        for key, _ in self.rdzv_conf:
            if key == "is_host":
                raise RequestError(
                    "--rdzv-conf is_host is fixed to false: the store runs outside the nodes "
                    "(`elastickit launch --store-only`)"
                )

    def rdzv_configs(self) -> dict[str, str]:
        return {**FAST_RDZV, **dict(self.rdzv_conf), "is_host": "false"}


def parse_nnodes(text: str) -> tuple[int, int]:
    """`4` or `2:4` -> (min, max); RequestError names the flag."""
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise RequestError(f"--nnodes {text!r} is not N or MIN:MAX (e.g. 2:4)") from None
    return a, b


def parse_rdzv_conf(text: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` -> pairs; RequestError names the item."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise RequestError(f"--rdzv-conf item {item!r} is not KEY=VALUE")
        out.append((k.strip(), v.strip()))
    return tuple(out)


def _agent_class() -> type:
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class ElastickitAgent(LocalElasticAgent):
        """torchrun's agent; healthy workers are kept when nodes join (see the module docstring)."""

        def _restart_workers(self, worker_group):  # type: ignore[no-untyped-def]
            if worker_group.state != WorkerState.HEALTHY:
                return super()._restart_workers(worker_group)  # a worker exited: torchrun's restart
            # A node waits to join and our workers are fine: take part in the next round so that
            # it completes and the new node starts its workers; ours keep their processes.
            pids = {w.local_rank: w.id for w in worker_group.workers}
            self._rendezvous(worker_group)
            for w in worker_group.workers:
                w.id = pids[w.local_rank]
            worker_group.state = WorkerState.HEALTHY
            return None

        def _exit_barrier(self):  # type: ignore[no-untyped-def]
            # The workers agree on the end of training through the store; agents of nodes lost
            # earlier would only make this wait for its timeout.
            return None

    return ElastickitAgent


def run_agent(req: AgentRequest) -> int:
    """Run this node's agent until the job ends; the agent's exit code (0: workers succeeded)."""
    req.check()
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # c10d's C++ warnings (each "sendBytes failed on SocketImpl(...)" of a connection the elastic
    # runtime shut down on purpose when a peer failed, dozens per recovery) format the socket's
    # address with a reverse DNS lookup apiece: a burst of lookups at the moment the new
    # generation opens its connections, whose own lookups the resolver then drops (5 s each,
    # seen here after a hung node). Errors still print; TORCH_CPP_LOG_LEVEL=WARNING shows all.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    node = req.node or socket.gethostname()
    # The node-local tier: RAM-backed storage of this machine, not the (shared) run directory.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    os.environ.setdefault("ELASTICKIT_LOCAL_TIER", os.path.join(shm, "elastickit", req.rdzv_id, node))
    os.environ.update(
        ELASTICKIT_STORE=req.rdzv_endpoint,
        ELASTICKIT_RUN_ID=req.rdzv_id,
        ELASTICKIT_NODE=node,
        ELASTICKIT_AGENT_PID=str(os.getpid()),
    )
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous import registry as rdzv_registry

    params = RendezvousParameters(
        backend="c10d",
        endpoint=req.rdzv_endpoint,
        run_id=req.rdzv_id,
        min_nodes=req.min_nodes,
        max_nodes=req.max_nodes,
        local_addr=req.local_addr,
        **req.rdzv_configs(),
    )
    spec = WorkerSpec(
        role="trainer",
        local_world_size=req.nproc_per_node,
        entrypoint=sys.executable,
        args=("-u", "-m", req.worker_module, *req.worker_args),
        rdzv_handler=rdzv_registry.get_rendezvous_handler(params),
        max_restarts=req.max_restarts,
        monitor_interval=req.monitor_interval_s,
        local_addr=req.local_addr,
    )
    agent = _agent_class()(spec=spec, logs_specs=DefaultLogsSpecs(), start_method="spawn")
    try:
        result = agent.run()
    finally:
        try:
            spec.rdzv_handler.shutdown()
        except Exception:  # noqa: BLE001 - the store may be gone at the very end
            pass
    if result is None:
        return 0
    if result.is_failed():
        for rank, failure in sorted(result.failures.items()):
            print(f"elastickit agent (node {node}): worker rank {rank} failed with exit code {failure.exitcode}",
                  file=sys.stderr, flush=True)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elastickit.elastic.agent")
    p.add_argument("--nnodes", default="1:1")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--rdzv-endpoint", required=True)
    p.add_argument("--rdzv-id", default="elastickit")
    p.add_argument("--rdzv-conf", default="")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--node", default="")
    p.add_argument("--local-addr", default=None)
    p.add_argument("--monitor-interval", type=float, default=0.1)
    p.add_argument("worker_args", nargs=argparse.REMAINDER)
    return p


def request_from(args: argparse.Namespace) -> AgentRequest:
    lo, hi = parse_nnodes(args.nnodes)
    extra = list(args.worker_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return AgentRequest(
        min_nodes=lo,
        max_nodes=hi,
        nproc_per_node=args.nproc_per_node,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
        node=args.node,
        local_addr=args.local_addr,
        rdzv_conf=parse_rdzv_conf(args.rdzv_conf),
        monitor_interval_s=args.monitor_interval,
        worker_args=tuple(extra),
    )


def main(argv: Sequence[str] | None = None) -> int:
    if os.environ.get("ELASTICKIT_DEBUG"):
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        return run_agent(request_from(build_parser().parse_args(argv)))
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
