"""`elastickit inspect CKPT [--json]`: layout, step, tensors, sizes, integrity."""

from __future__ import annotations

import json
import time

import typer

from ._console import human_bytes, out
from ._errors import handled


@handled
def inspect(
    ckpt: str = typer.Argument(..., help="A checkpoint directory or URL, or a root (its newest checkpoint)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    tensors: int = typer.Option(40, "--tensors", help="How many tensors to list (0: all)."),
) -> None:
    """Show a checkpoint's step, layout, tensors, files and integrity."""
    from rich.table import Table

    from elastickit.checkpoint.errors import RequestError
    from elastickit.checkpoint.paths import location
    from elastickit.inspection import inspect_checkpoint

    if tensors < 0:
        raise RequestError(f"--tensors {tensors}: give how many tensors to list, or 0 for all")
    info = inspect_checkpoint(location(ckpt, what="CKPT"))
    if as_json:
        print(json.dumps(info, indent=1))
        return
    layout = ",".join(f"{a}={n}" for a, n in info["layout"]["axes"].items())
    if info["layout"]["zero"]:
        layout += f",zero={info['layout']['zero']}"
    out.print(f"[bold]{info['path']}[/bold]")
    out.print(
        f"step {info['step']}  format {info['format_version']}  saved "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['created_s']))}  by {info['world_size']} rank(s)"
    )
    out.print(f"layout {layout}  rules {info['num_rules']}  state {', '.join(info['objects'])}")
    out.print(
        f"{info['num_tensors']} tensors, {human_bytes(info['total_bytes'])} logical, "
        f"{human_bytes(info['stored_bytes'])} stored in {len(info['files'])} file(s); integrity: {info['integrity']}"
    )
    table = Table("tensor", "dtype", "shape", "shards", "size", box=None, pad_edge=False)
    shown = info["tensors"] if tensors == 0 else info["tensors"][:tensors]
    for t in shown:
        table.add_row(t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", str(t["num_shards"]), human_bytes(t["bytes"]))
    out.print(table)
    if len(shown) < len(info["tensors"]):
        out.print(f"... {len(info['tensors']) - len(shown)} more (--tensors 0 lists all)")
