"""`elastickit dashboard`: the cluster health page of a run (its directory, an events file, and/or
the live store of a running job)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

from elastickit.cli._errors import handled

if TYPE_CHECKING:
    from elastickit.dashboard.logs import RunSources
    from elastickit.dashboard.store import StoreView


def sources_from(run: str | None, events: str | None, ckpt: str | None, local: str | None,
                 store: str | None) -> RunSources:
    """The RunSources for the flags (shared with `elastickit top`); RequestError on bad ones."""
    import os

    from elastickit.checkpoint.errors import RequestError
    from elastickit.dashboard.logs import RunSources

    if run is not None and events is not None:
        raise RequestError("give either RUN (a run directory) or --events FILE, not both.")
    if run is None and events is None and store is None:
        raise RequestError("give RUN (a run directory), --events FILE or --store HOST:PORT.")
    if run is not None:
        if not os.path.isdir(run):
            what = "a file" if os.path.exists(run) else "not there"
            hint = " (use --events for an events file)" if os.path.isfile(run) else ""
            raise RequestError(f"{run} is {what}: RUN must be a run directory{hint}.")
        if local and "{node}" not in local:
            raise RequestError(f"--local {local!r} must contain {{node}}, e.g. /dev/shm/ek/{{node}}.")
        return RunSources.from_run_dir(run, ckpt=ckpt or "", local_pattern=local or "")
    if events is not None:
        if os.path.isdir(events):
            raise RequestError(f"--events {events} is a directory: pass it as RUN instead.")
        return RunSources.from_events_file(events)
    return RunSources(label=f"store {store}")


def live_view(store: str | None, prefix: str, world_size: int) -> StoreView | None:
    """A StoreView of the job at `store`, or None; RequestError when it cannot be reached."""
    if store is None:
        return None
    from elastickit.checkpoint.errors import RequestError
    from elastickit.dashboard.store import connect

    try:
        return connect(store, prefix=prefix, world_size=world_size)
    except ValueError as e:
        raise RequestError(str(e)) from e


@handled
def dashboard(
    run: str | None = typer.Argument(None, help="The run directory (events.jsonl, steps.jsonl, ckpt/, ...)."),
    events: str | None = typer.Option(None, "--events", help="An events file (JSON lines) instead of RUN."),
    store: str | None = typer.Option(
        None, "--store", help="HOST:PORT of a running job's TCPStore: adds each rank's live heartbeat."
    ),
    ckpt: str | None = typer.Option(None, "--ckpt", help="The checkpoint root, when not RUN/ckpt."),
    local: str | None = typer.Option(
        None, "--local", help="Node-local tier directories not named in nodes.json, e.g. /dev/shm/ek/{node}."
    ),
    world_size: int = typer.Option(0, "--world-size", help="Ranks of the job (--store; 0: discover)."),
    prefix: str = typer.Option("auto", "--prefix", help="The monitor's store key prefix (--store)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (beyond loopback needs --token)."),
    port: int = typer.Option(8765, "--port", help="Port to bind (0: any free port)."),
    token: str | None = typer.Option(
        None, "--token", envvar="ELASTICKIT_DASHBOARD_TOKEN",
        help="Required to bind beyond 127.0.0.1; open the page once as /?token=...",
    ),
) -> None:
    """Serve the cluster health page: job, step-time heatmap, links, incidents, checkpoints
    (with what each node's loss would cost), curves and events, live."""
    from elastickit.checkpoint.errors import RequestError
    from elastickit.dashboard.server import make_server
    from elastickit.dashboard.summary import Dashboard

    sources = sources_from(run, events, ckpt, local, store)
    if not 0 <= port < 65536:
        raise RequestError(f"--port {port} is not a port number; give 0..65535.")
    board = Dashboard(sources, live=live_view(store, prefix, world_size))
    board.summary()  # read everything once (and import torch) before the first page asks
    try:
        server = make_server(board, host=host, port=port, token=token)
    except ValueError as e:
        raise RequestError(f"--host {host}: {e} with --token (or ELASTICKIT_DASHBOARD_TOKEN).") from e
    except OSError as e:
        raise RequestError(f"--port {port}: cannot bind {host}:{port} ({e}); pick another port or 0.") from e
    suffix = "?token=<your token>" if token else ""
    print(f"dashboard of {sources.label} on {server.url}{suffix} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
