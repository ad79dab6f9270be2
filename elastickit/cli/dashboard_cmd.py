"""`elastickit dashboard`: a live page of the monitor's findings (events file or live store)."""

from __future__ import annotations

import typer

from elastickit.cli._errors import handled


@handled
def dashboard(
    events: str | None = typer.Option(None, "--events", help="Events file (JSON lines) to show."),
    store: str | None = typer.Option(
        None, "--store", help="HOST:PORT of the job's TCPStore: run a read-only collector on it."
    ),
    world_size: int = typer.Option(
        0, "--world-size", help="Ranks of the job (--store; 0: discover)."
    ),
    prefix: str = typer.Option(
        "auto",
        "--prefix",
        help="Store key prefix of the monitor (--store; auto: try the usual ones).",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8765, "--port", help="Port to bind (0: any free port)."),
    token: str | None = typer.Option(
        None, "--token", help="Required to bind beyond 127.0.0.1; clients pass ?token=..."
    ),
) -> None:
    """Serve a live dashboard of anomaly events (slow rank, slow link, hang, crash)."""
    import sys

    from elastickit.checkpoint.errors import RequestError
    from elastickit.monitor.dashboard import CollectorSource, EventsFileSource, make_server

    if (events is None) == (store is None):
        raise RequestError("give exactly one of --events FILE or --store HOST:PORT.")
    if events is not None:
        source = EventsFileSource(events)
        title = f"elastickit monitor: {events}"
    else:
        source = CollectorSource(_collector(store, world_size, prefix))
        title = f"elastickit monitor: store {store}"
    try:
        server = make_server(source, host=host, port=port, token=token, title=title)
    except ValueError as e:
        raise RequestError(f"--host {host}: {e} with --token.") from e
    except OSError as e:
        raise RequestError(
            f"--port {port}: cannot bind {host}:{port} ({e}); pick another port."
        ) from e
    print(
        f"dashboard on http://{host}:{server.server_port}/ (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _collector(store: str, world_size: int, prefix: str):
    import datetime

    import torch.distributed as dist

    from elastickit.checkpoint.errors import RequestError
    from elastickit.monitor import Collector

    host, _, port_text = store.rpartition(":")
    if not host or not port_text.isdigit():
        raise RequestError(f"--store {store!r}: expected HOST:PORT, e.g. 127.0.0.1:29500.")
    try:
        tcp = dist.TCPStore(
            host, int(port_text), is_master=False, timeout=datetime.timedelta(seconds=10)
        )
    except Exception as e:
        raise RequestError(f"--store {store}: cannot connect ({e}); is the job running?") from e
    if prefix == "auto":
        # The job's default store is the TCPStore behind PrefixStores: "<group>/" (explicit
        # store) or "default_pg" + "<group>/" (env:// rendezvous, as under torchrun).
        candidates = ["default_pg/0//ekmon", "0//ekmon", "ekmon"]
        prefix = next((c for c in candidates if tcp.check([f"{c}/hb/0"])), "")
        if not prefix:
            raise RequestError(
                f"--store {store}: no monitor heartbeats under {candidates}; give --prefix."
            )
    if world_size <= 0:
        world_size = 0
        while tcp.check([f"{prefix}/hb/{world_size}"]):
            world_size += 1
        if world_size == 0:
            raise RequestError(
                f"--store {store}: no monitor heartbeats under {prefix!r}; check "
                "--prefix or give --world-size."
            )
    collector = Collector(
        tcp, world_size=world_size, prefix=prefix, abort_on_hang=False, on_abort=None
    )
    collector.start()
    return collector
