"""`elastickit verify CKPT`: every checksum; exit 1 naming each corrupt file and its tensors."""

from __future__ import annotations

import json

import typer

from ._console import err, human_bytes, out
from ._errors import handled


@handled
def verify(
    ckpt: str = typer.Argument(..., help="A checkpoint directory or URL, or a root (its newest checkpoint)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every byte of a checkpoint against its manifest; exit 1 on any corruption."""
    from elastickit.checkpoint.paths import location
    from elastickit.inspection import verify as run

    report = run(location(ckpt, what="CKPT"))
    if as_json:
        print(json.dumps(report, indent=1))
    elif report["ok"]:
        out.print(
            f"ok: {report['path']} (step {report['step']}): {report['files_checked']} file(s), "
            f"{human_bytes(report['bytes_checked'])} verified"
        )
    for p in report["problems"]:
        names = ", ".join(p["tensors"][:8]) + (f" and {len(p['tensors']) - 8} more" if len(p["tensors"]) > 8 else "")
        err.print(f"corrupt: {p['reason']}; tensors: {names or '(none)'}", soft_wrap=True)
    if not report["ok"]:
        raise typer.Exit(1)
