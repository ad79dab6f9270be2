"""`elastickit demo`: the end-to-end story on this machine."""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import typer

from ._console import err, out
from ._errors import handled


@handled
def demo(
    workdir: str | None = typer.Option(
        None, "--workdir",
        help="Keep the run here, in WORKDIR/run (default: runs/demo; the next demo replaces it). "
        "With --checkpoints: the checkpoints (default: a temporary folder).",
    ),
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
    from elastickit.demo import DEMO_RUN, ELASTIC_NODES, prepare_run_dir, run

    run_dir = prepare_run_dir(os.path.join(workdir, "run") if workdir else DEMO_RUN)
    out.print(f"[bold]elastickit demo[/bold]: elastic recovery of a tiny GPT (FSDP2) on {ELASTIC_NODES} simulated "
              f"nodes, each a torchrun elastic agent with one worker (gloo, this machine); run directory {_shown(run_dir)}")
    try:
        with out.status("training (the nodes start in a few seconds)...") as status:
            story = run(run_dir, on_stage=show, on_line=lambda s: status.console.print(f"      [dim]{s}[/dim]"))
        _mttr_table(story.recoveries)
        _curve(story.curve)
    finally:
        for line in look_lines(run_dir):
            out.print(line, markup=False, highlight=False)
    if not all(s.ok for s in story.stages):
        raise typer.Exit(1)
    out.print("[bold green]demo passed[/bold green]")


def look_lines(run_dir: str) -> list[str]:
    """Where the demo's run is kept and the commands that show it (runnable as printed: the
    executable as this process was started when `elastickit` on PATH is another one)."""
    run = shlex.quote(_shown(run_dir))
    exe = _executable()
    return [
        f"the run is kept in {run} (steps.jsonl, events.jsonl with the recoveries, nodes.json, ckpt/, local/); see it with:",
        f"  {exe} dashboard {run}    # the health page on http://127.0.0.1:8765/ (the killed node, the recovery by phase, each tier's recovery point)",
        f"  {exe} top {run}          # the same in this terminal",
        f"  {exe} ls {run}           # its checkpoints and the MTTR of each recovery",
    ]


def _shown(path: str) -> str:
    """`path` relative to the working directory when inside it, else absolute."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith(os.pardir) else os.path.abspath(path)


def _executable() -> str:
    """`elastickit` when that is this executable on the caller's PATH (scripts/demo passes the
    PATH it was started with as EK_CALLER_PATH), else this executable's path."""
    me = os.path.realpath(sys.argv[0]) if sys.argv and os.path.basename(sys.argv[0]) == "elastickit" else ""
    found = shutil.which("elastickit", path=os.environ.get("EK_CALLER_PATH"))
    if not me or (found and os.path.realpath(found) == me):
        return "elastickit"
    return shlex.quote(_shown(sys.argv[0]))


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
