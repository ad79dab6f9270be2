"""`elastickit ls ROOT`: the checkpoints under a root, with their status."""

from __future__ import annotations

import json
import time

import typer

from ._console import human_bytes, out
from ._errors import handled


@handled
def ls(
    root: str = typer.Argument(
        ..., help="A checkpoint root directory or URL (s3://bucket/run), or a run directory (RUN)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the listing as JSON."),
) -> None:
    """List the checkpoints under ROOT: step, tier, status, size, time; and the run's recoveries."""
    from rich.table import Table

    from elastickit.checkpoint.paths import is_url, location
    from elastickit.elastic.rundir import locate, mttr_lines, read_recoveries
    from elastickit.inspection import list_root

    root = location(root, what="ROOT")
    root, events = (root, None) if is_url(root) else locate(root)
    rows = list_root(root)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    recoveries = mttr_lines(read_recoveries(events) if events else [])
    if not rows:
        out.print(f"no checkpoints under {root}")
        for line in recoveries:
            out.print(line)
        return
    table = Table("step", "tier", "status", "size", "saved", "ranks", box=None, pad_edge=False)
    for r in rows:
        table.add_row(
            str(r["step"]),
            r["tier"],
            r["status"],
            human_bytes(r["stored_bytes"]) if "stored_bytes" in r else "-",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_s"])) if "created_s" in r else "-",
            str(r.get("world_size", "-")),
        )
    out.print(table)
    # Reasons go below the table, whole (a table column would cut them at the terminal's width).
    for r in rows:
        if r.get("reason"):
            out.print(f"step {r['step']} ({r['tier']}, {r['status']}): {r['reason']}", markup=False)
    for line in recoveries:
        out.print(line)
