"""`elastickit train`: the reference hybrid-parallel trainer under torchrun."""

from __future__ import annotations

import sys

import typer

from ._errors import handled


@handled
def train(
    layout: str | None = typer.Option(
        None,
        "--layout",
        help="Parallel layout, e.g. dp=2,tp=2 (default single); with --nodes: auto or axes to pin, e.g. tp=2.",
    ),
    nproc: int | None = typer.Option(
        None, "--nproc", help="Ranks to start (default: the layout's size)."
    ),
    steps: int = typer.Option(20, "--steps", help="Total training steps."),
    ckpt: str | None = typer.Option(
        None, "--ckpt", help="Checkpoint root; restores from it if it holds one."
    ),
    every: int | None = typer.Option(
        None, "--every", help="Checkpoint every N steps (default 10; with --nodes 1, to host memory)."
    ),
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
    nodes: int | None = typer.Option(
        None, "--nodes", help="Elastic: N simulated nodes on this machine, each a torchrun agent."
    ),
    min_nodes: int | None = typer.Option(None, "--min-nodes", help="With --nodes: fewest nodes to train on."),
    nproc_per_node: int | None = typer.Option(None, "--nproc-per-node", help="With --nodes: workers per node (default 1)."),
    global_batch: int | None = typer.Option(
        None, "--global-batch", help="With --nodes: samples per step, kept in every layout (default 24)."
    ),
    micro_batch: int | None = typer.Option(None, "--micro-batch", help="With --nodes: samples per microbatch (default 2)."),
    run: str | None = typer.Option(
        None, "--run", help="With --nodes: the run directory (default runs/train-<time>)."
    ),
    rejoin_after: float | None = typer.Option(
        None, "--rejoin-after", help="With --nodes: restart a killed node after S seconds; the job grows back."
    ),
    hang_timeout: float | None = typer.Option(
        None, "--hang-timeout", help="With --nodes: seconds of silence (or of a training loop standing still while its peers wait) after which a worker counts as hung (default 1)."
    ),
    step_sleep: float | None = typer.Option(
        None, "--step-sleep", help="With --nodes: extra seconds per step, to follow a run as it happens (or leave a killed node time to come back before the end)."
    ),
) -> None:
    """Train the reference GPT under torchrun; print each step's loss and time.

    With --nodes N: N simulated nodes (torchrun elastic agents) train elastically; a node killed
    (--inject killnode:node=J:step=S) or hung (stopnode:...), or a worker whose training loop
    stopped while its process lives (hang:rank=R:step=S), is left out in seconds, the job goes
    on at a new layout, and with --rejoin-after it grows back."""
    if nodes is not None:
        from .train_nodes import train_nodes

        code = train_nodes(
            nodes=nodes, min_nodes=min_nodes, nproc_per_node=nproc_per_node or 1, run=run, ckpt=ckpt,
            layout=layout or "auto", steps=steps, model=model, every=every or 1, inject=inject or [],
            global_batch=global_batch, micro_batch=micro_batch, rejoin_after=rejoin_after,
            hang_timeout=hang_timeout, dp_mode=dp_mode, step_sleep=step_sleep,
        )
        if code:
            raise typer.Exit(code)
        return
    elastic_only = {"--min-nodes": min_nodes, "--nproc-per-node": nproc_per_node, "--global-batch": global_batch,
                    "--micro-batch": micro_batch,
                    "--run": run, "--rejoin-after": rejoin_after, "--hang-timeout": hang_timeout,
                    "--step-sleep": step_sleep}
    for flag, value in elastic_only.items():
        if value is not None:
            from ._errors import fail

            raise fail(f"{flag} applies to elastic runs; add --nodes N", 2)
    layout = layout or "single"
    every = every or 10
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
