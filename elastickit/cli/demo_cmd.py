"""`elastickit demo`: the end-to-end story on this machine."""

from __future__ import annotations

import typer

from ._console import err, out
from ._errors import handled


@handled
def demo(
    workdir: str | None = typer.Option(None, "--workdir", help="Keep the run's files here (default: a temporary folder)."),
    checkpoints: bool = typer.Option(
        False, "--checkpoints", help="The checkpoint story instead: resume bit-exactly, reshard, verify."
    ),
) -> None:
    """4 simulated nodes; one is killed and comes back; the run goes on at a new layout (MTTR table)."""
    from elastickit.demo import Stage

    def show(s: Stage) -> None:
        mark = "[green]ok[/green]" if s.ok else "[red]FAILED[/red]"
        out.print(f"{mark}  {s.title}  [dim]({s.seconds:.1f} s)[/dim]")
        if s.losses:
            out.print("      losses " + " ".join(f"{x:.6f}" for x in s.losses))
        out.print(f"      {s.detail}")

    if checkpoints:
        from elastickit.demo import run_checkpoints

        out.print("[bold]elastickit demo --checkpoints[/bold]: a tiny GPT on 2 local ranks (torch.distributed, gloo)")
        with out.status("running..."):
            stages = run_checkpoints(workdir, on_stage=show)
        if not all(s.ok for s in stages) or len(stages) < 5:
            raise typer.Exit(1)
        out.print("[bold green]demo passed[/bold green]")
        return
    from elastickit.demo import ELASTIC_NODES, run

    out.print(f"[bold]elastickit demo[/bold]: elastic recovery of a tiny GPT (FSDP2) on {ELASTIC_NODES} simulated "
              "nodes, each a torchrun elastic agent with one worker (gloo, this machine)")
    with out.status("training (the nodes start in a few seconds)...") as status:
        story = run(workdir, on_stage=show, on_line=lambda s: status.console.print(f"      [dim]{s}[/dim]"))
    _mttr_table(story.recoveries)
    _curve(story.curve)
    if not all(s.ok for s in story.stages):
        raise typer.Exit(1)
    out.print("[bold green]demo passed[/bold green]")


def _mttr_table(recs: list[dict]) -> None:
    from elastickit.elastic.rundir import mttr_lines

    for line in mttr_lines(recs):
        out.print(line)


def _curve(curve: list[tuple[int, int, float, float]]) -> None:
    if not curve:
        err.print("no steps")
        return
    out.print("step  world  loss       without failures")
    for step, world, loss, ref in curve:
        out.print(f"{step:4d}  {world:5d}  {loss:.6f}   {ref:.6f}")
