"""`elastickit demo`: the end-to-end story on this machine."""

from __future__ import annotations

import typer

from ._console import out
from ._errors import handled


@handled
def demo(
    workdir: str | None = typer.Option(None, "--workdir", help="Keep the run's files here (default: a temporary folder)."),
) -> None:
    """Train, lose the job, resume bit-exactly, resume into another layout, verify."""
    from elastickit.demo import Stage, run

    out.print("[bold]elastickit demo[/bold]: a tiny GPT on 2 local ranks (torch.distributed, gloo)")

    def show(s: Stage) -> None:
        mark = "[green]ok[/green]" if s.ok else "[red]FAILED[/red]"
        out.print(f"{mark}  {s.title}  [dim]({s.seconds:.1f} s)[/dim]")
        if s.losses:
            out.print("      losses " + " ".join(f"{x:.6f}" for x in s.losses))
        out.print(f"      {s.detail}")

    with out.status("running..."):
        stages = run(workdir, on_stage=show)
    if not all(s.ok for s in stages) or len(stages) < 5:
        raise typer.Exit(1)
    out.print("[bold green]demo passed[/bold green]")
