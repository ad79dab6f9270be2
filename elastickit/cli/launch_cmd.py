"""`elastickit launch`: one node's elastic agent, run on every node as people run torchrun.

    elastickit launch --nnodes 2:4 --nproc-per-node 8 --rdzv-endpoint HOST:PORT --rdzv-id job1 \\
        -- --run /shared/runs/job1 --steps 10000 --layout tp=2

Everything after `--` goes to the elastic trainer (`python -m elastickit.elastic.worker`).
`--store-only` serves the rendezvous store instead (on a machine that is not a training node).
"""

from __future__ import annotations

import typer

from ._console import err
from ._errors import handled


@handled
def launch(
    trainer_flags: list[str] | None = typer.Argument(  # noqa: B008 - typer reads it
        None, help="Flags of the elastic trainer, after `--` (e.g. -- --run RUN --steps 1000)."
    ),
    nnodes: str = typer.Option("1:1", "--nnodes", help="MIN:MAX nodes (or N)."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Workers on this node."),
    rdzv_endpoint: str = typer.Option(..., "--rdzv-endpoint", help="HOST:PORT of the rendezvous store."),
    rdzv_id: str = typer.Option("elastickit", "--rdzv-id", help="The job's id (unique per job)."),
    max_restarts: int = typer.Option(3, "--max-restarts", help="Restarts of this node's workers when one exits."),
    rdzv_conf: str = typer.Option(
        "", "--rdzv-conf", help="Rendezvous settings, e.g. last_call_timeout=1,keep_alive_interval=1."
    ),
    node: str = typer.Option("", "--node", help="This node's name (default: the host name)."),
    local_addr: str | None = typer.Option(None, "--local-addr", help="This node's address for the rendezvous."),
    store_only: bool = typer.Option(False, "--store-only", help="Serve the rendezvous store; start no agent."),
) -> None:
    """Run this node's agent (torchrun elastic) for an elastic job; workers recover in-process."""
    import socket

    from elastickit.checkpoint.errors import RequestError
    from elastickit.elastic.agent import AgentRequest, parse_nnodes, parse_rdzv_conf, run_agent
    from elastickit.elastic.store import reachable, serve, spawn_detached

    lo, hi = parse_nnodes(nnodes)
    req = AgentRequest(
        min_nodes=lo,
        max_nodes=hi,
        nproc_per_node=nproc_per_node,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_id=rdzv_id,
        max_restarts=max_restarts,
        node=node,
        local_addr=local_addr,
        rdzv_conf=parse_rdzv_conf(rdzv_conf),
        worker_args=tuple(trainer_flags or ()),
    )
    req.check()
    host, _, port = rdzv_endpoint.rpartition(":")
    if store_only:
        raise typer.Exit(serve(host, int(port)))
    if not trainer_flags:
        raise RequestError("give the trainer's flags after `--`, e.g. -- --run runs/job1 --steps 1000")
    from elastickit.elastic.config import first_layout
    from elastickit.elastic.worker import parse_flags

    cfg = parse_flags(trainer_flags)
    err.print(f"elastickit launch: node {node or socket.gethostname()}, {nproc_per_node} worker(s); "
              f"at {hi} node(s): {first_layout(cfg, [nproc_per_node] * hi)}")
    if not reachable(host, int(port)):
        if host not in ("127.0.0.1", "localhost", "::1", socket.gethostname()):
            raise RequestError(
                f"no rendezvous store answers at {rdzv_endpoint}; start one with "
                f"`elastickit launch --store-only --rdzv-endpoint {rdzv_endpoint}` on a machine that is not a node"
            )
        pid = spawn_detached(host, int(port), rdzv_id)
        err.print(f"elastickit launch: started the rendezvous store at {rdzv_endpoint} (pid {pid}, its own "
                  "session: no node's death takes it down; it exits when the job is done)")
    code = run_agent(req)
    if code:
        raise typer.Exit(code)
