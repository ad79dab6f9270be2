"""Launch the reference trainer under torchrun (the logic behind `elastickit train`).

`TrainRequest.check` finds, before anything starts, whatever the workers would otherwise
fail on one error per rank: the layout, rank count, model, parallel modes, the `--inject`
faults (`preflight`). `TrainRequest.check_paths` then looks at the disk: the checkpoint root
must be writable and hold the same model. `torchrun_command` is pure, so tests see the exact
command; `launch` runs it under `supervise.run_job` and returns what happened.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TYPE_CHECKING

from elastickit.checkpoint.errors import RequestError

from .model import CONFIGS
from .parallel import TrainLayout
from .preflight import plural

if TYPE_CHECKING:
    from .loop import TrainConfig

__all__ = ["TrainOutcome", "TrainRequest", "launch", "log_path", "torchrun_command"]

PP_SCHEDULES = ("gpipe", "1f1b")
DP_MODES = ("fsdp", "replicate")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainRequest:
    """One `elastickit train` invocation."""

    layout: str = "single"
    """`dp=2,tp=2`-style layout (axes pp, dp, tp)."""
    nproc: int | None = None
    """Ranks to start; None: the layout's world size (they must agree)."""
    steps: int = 20
    """Total steps."""
    model: str = "tiny"
    """Model config name."""
    ckpt: str | None = None
    """Checkpoint root (None: no checkpoints)."""
    every: int = 10
    """Checkpoint interval in steps."""
    inject: tuple[str, ...] = ()
    """Fault specs for elastickit.faults."""
    events: str | None = None
    """Events file for the monitor (None: `<ckpt>/events.jsonl`, or ./events.jsonl)."""
    monitor: bool | None = None
    """Probe the collectives; None: on when inject or events is given."""
    pp_schedule: str = "gpipe"
    """Pipeline schedule: gpipe or 1f1b."""
    dp_mode: str = "fsdp"
    """Data parallel: fsdp (FSDP2) or replicate."""
    extra_args: tuple[str, ...] = ()
    """More worker flags, passed through verbatim (e.g. ("--global-batch", "16"))."""

    def resolved_layout(self) -> TrainLayout:
        """The layout; RequestError if it does not parse."""
        try:
            return TrainLayout.parse(self.layout)
        except ValueError as e:
            raise RequestError(f"--layout {self.layout!r}: {e}") from e

    def resolved_nproc(self) -> int:
        """Ranks to start; RequestError if --nproc disagrees with the layout."""
        n = self.resolved_layout().world_size
        if self.nproc is not None and self.nproc != n:
            raise RequestError(
                f"--nproc {self.nproc} does not match --layout {self.layout} "
                f"({plural(n, 'rank')}); pass --nproc {n} or change the layout"
            )
        return n

    def monitor_on(self) -> bool:
        """--monitor/--no-monitor, defaulting to on when faults or events are asked for."""
        return bool(self.inject or self.events) if self.monitor is None else self.monitor

    def events_path(self) -> str:
        """Where the monitor writes its events (the checkpoint root's log by default, where
        the `auto` interval policy learns the failure rate from them)."""
        return self.events or os.path.join(self.ckpt or ".", "events.jsonl")

    def worker_flags(self) -> list[str]:
        """The flags every worker gets (after `-m elastickit.trainer.worker`)."""
        flags = ["--layout", str(self.resolved_layout()), "--steps", str(self.steps)]
        flags += ["--model", self.model, "--every", str(self.every)]
        flags += ["--pp-schedule", self.pp_schedule, "--dp-mode", self.dp_mode]
        if self.ckpt:
            flags += ["--ckpt", self.ckpt]
        for spec in self.inject:
            flags += ["--inject", spec]
        if self.monitor_on():
            # Not `--monitor`: torchrun would take it as an abbreviation of its --monitor-interval.
            flags += ["--collective-monitor", "--events", self.events_path()]
        elif self.events:
            flags += ["--events", self.events]
        return flags + list(self.extra_args)

    def check(self) -> None:
        """Raise RequestError for anything in the request that would fail after launch."""
        world = self.resolved_nproc()
        if self.model not in CONFIGS:
            raise RequestError(
                f"--model {self.model!r} is unknown; choose one of {', '.join(CONFIGS)}"
            )
        if self.steps < 1 or self.every < 1:
            raise RequestError("--steps and --every must be positive")
        for flag, value, choices in (
            ("--pp-schedule", self.pp_schedule, PP_SCHEDULES),
            ("--dp-mode", self.dp_mode, DP_MODES),
        ):
            if value not in choices:
                raise RequestError(f"{flag} {value!r} is unknown; choose {' or '.join(choices)}")
        cfg = self._config()
        from .preflight import check_faults, check_layout

        check_layout(
            self.model,
            cfg.model_config(),
            cfg.train_layout(),
            global_batch=cfg.global_batch,
            grad_accum=cfg.grad_accum,
            dp_mode=cfg.dp_mode,
        )
        check_faults(
            self.inject, world_size=world, steps=self.steps, first_step=0, monitor=self.monitor_on()
        )

    def check_paths(self) -> int:
        """Check what the job will read and write; return the step it resumes after (0: a fresh
        run). RequestError if the checkpoint root or events file cannot be written, if the
        root's newest checkpoint holds another model, or if an `--inject` step falls before
        the resumed step."""
        from elastickit.checkpoint.paths import writable_dir
        from elastickit.checkpoint.runs import refuse_checkpoint_dir

        from .preflight import check_checkpoint_model, check_faults, model_tensors

        if self.monitor_on() or self.events:
            writable_dir(os.path.dirname(os.path.abspath(self.events_path())), what="--events")
        if not self.ckpt:
            return 0
        refuse_checkpoint_dir(self.ckpt)
        writable_dir(self.ckpt, what="--ckpt")
        cfg = CONFIGS[self.model]
        start = check_checkpoint_model(self.ckpt, self.model, model_tensors(cfg))
        check_faults(
            self.inject,
            world_size=self.resolved_nproc(),
            steps=self.steps,
            first_step=start,
            monitor=self.monitor_on(),
        )
        return start

    def _config(self) -> TrainConfig:
        """The TrainConfig the workers will build from `worker_flags`."""
        from .worker import build_parser, config_from_args

        parser = build_parser()

        def refuse(message: str) -> None:
            raise RequestError(f"worker flags {' '.join(self.extra_args)!r}: {message}")

        parser.error = refuse  # type: ignore[method-assign] - a sentence, not usage + exit 2
        try:
            return config_from_args(parser.parse_args(self.worker_flags()))
        except ValueError as e:
            raise RequestError(f"{e}; check --steps, --every and the worker flags") from e


def torchrun_command(req: TrainRequest, python: str = sys.executable) -> list[str]:
    """The torchrun command line for `req` (standalone rendezvous on a free local port)."""
    req.check()
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(req.resolved_nproc()),
        "-m",
        "elastickit.trainer.worker",
        *req.worker_flags(),
    ]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainOutcome:
    """How a launched job ended, and what to tell the user."""

    exit_code: int
    """0 done, 1 the job failed, 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM)."""
    summary: tuple[str, ...]
    """Lines for stdout after the job's own (its checkpoints)."""
    errors: tuple[str, ...]
    """Lines for stderr: what happened and how to resume (empty when it succeeded)."""
    log_path: str
    """Where the workers' and torchrun's stderr went."""


def log_path(req: TrainRequest) -> str:
    """The job's log: `<ckpt>/train.log` (appended across runs), else a new temporary file."""
    if req.ckpt:
        return os.path.join(req.ckpt, "train.log")
    import tempfile

    fd, path = tempfile.mkstemp(prefix="elastickit-train-", suffix=".log")
    os.close(fd)
    return path


def launch(req: TrainRequest) -> TrainOutcome:
    """Check the request, run the job under `supervise.run_job`, say how it ended.

    RequestError (before anything starts) for a request that would fail after launch.
    """
    import time

    from elastickit.checkpoint.events import read_events
    from elastickit.checkpoint.format.directory import list_checkpoints

    from . import report
    from .supervise import run_job

    cmd = torchrun_command(req)
    req.check_paths()
    env = dict(os.environ)
    # Each worker opens its own store client instead of sharing torchrun's rendezvous store:
    # avoids a teardown race of the shared TCPStore on some torch versions.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    log = log_path(req)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    result = run_job(cmd, env=env, log_path=log, header=f"=== {stamp} {' '.join(cmd)}")
    # This run's records: the monitor's events and the Checkpointer's (<ckpt>/events.jsonl).
    paths = {req.events_path()} | ({os.path.join(req.ckpt, "events.jsonl")} if req.ckpt else set())
    events = [
        e
        for path in sorted(paths)
        for e in read_events(path)
        if float(e.get("time", 0)) >= result.started_s
    ]
    summary = report.checkpoint_lines(events, req.ckpt) if req.ckpt else []
    if result.returncode == 0 and result.stopped_by is None:
        if not req.ckpt:  # a temporary log nobody was pointed to
            os.unlink(log)
        return TrainOutcome(exit_code=0, summary=tuple(summary), errors=(), log_path=log)
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(result.log_offset)
        text = f.read()
    done = [c.step for c in list_checkpoints(req.ckpt) if c.complete] if req.ckpt else []
    errors = (
        report.failure_line(
            returncode=result.returncode,
            stopped_by=result.stopped_by,
            events=events,
            log_text=text,
            world_size=req.resolved_nproc(),
            inject=req.inject,
        ),
        report.resume_line(
            ckpt=req.ckpt, last_step=done[-1] if done else None, inject=req.inject, log_path=log
        ),
    )
    code = 128 + result.stopped_by if result.stopped_by is not None else 1
    return TrainOutcome(exit_code=code, summary=tuple(summary), errors=errors, log_path=log)
