"""`elastickit train`: the reference hybrid-parallel trainer under torchrun."""

from __future__ import annotations

import sys

import typer

from ._errors import handled


@handled
def train(
    layout: str = typer.Option(
        "single", "--layout", help="Parallel layout, e.g. dp=2,tp=2 or pp=2,tp=2."
    ),
    nproc: int | None = typer.Option(
        None, "--nproc", help="Ranks to start (default: the layout's size)."
    ),
    steps: int = typer.Option(20, "--steps", help="Total training steps."),
    ckpt: str | None = typer.Option(
        None, "--ckpt", help="Checkpoint root; restores from it if it holds one."
    ),
    every: int = typer.Option(10, "--every", help="Checkpoint every N steps."),
    model: str = typer.Option(
        "tiny", "--model", help="Model size: tiny, tiny-moe or small (~100M)."
    ),
    inject: list[str] | None = typer.Option(  # noqa: B008 - typer reads it
        None, "--inject", help="Fault to inject (repeatable), e.g. crash:rank=1:step=5."
    ),
    events: str | None = typer.Option(None, "--events", help="Write monitor events to this file."),
    monitor: bool | None = typer.Option(
        None,
        "--monitor/--no-monitor",
        help="Probe collectives (default: on with --inject/--events).",
    ),
    pp_schedule: str = typer.Option(
        "gpipe", "--pp-schedule", help="Pipeline schedule: gpipe or 1f1b."
    ),
    dp_mode: str = typer.Option(
        "fsdp", "--dp-mode", help="Data parallel: fsdp (FSDP2) or replicate."
    ),
) -> None:
    """Train the reference GPT under torchrun; print each step's loss and time."""
    from elastickit.checkpoint.paths import local_path
    from elastickit.trainer.launch import TrainRequest, launch

    req = TrainRequest(
        layout=layout,
        nproc=nproc,
        steps=steps,
        model=model,
        ckpt=local_path(ckpt, what="--ckpt") if ckpt else None,
        every=every,
        inject=tuple(inject or ()),
        events=events,
        monitor=monitor,
        pp_schedule=pp_schedule,
        dp_mode=dp_mode,
    )
    outcome = launch(req)
    for line in outcome.summary:
        print(line, flush=True)
    for i, line in enumerate(outcome.errors):
        print(f"error: {line}" if i == 0 else line, file=sys.stderr, flush=True)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)
