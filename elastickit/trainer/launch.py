"""Launch the reference trainer under torchrun (the logic behind `elastickit train`).

`TrainRequest` is checked before anything starts (layout, rank count, model name, whether
fault injection exists in this build); `torchrun_command` is pure, so tests see the exact
command; `launch` runs it with stdout/stderr passed through and returns torchrun's exit code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

from elastickit.checkpoint.errors import RequestError

from .model import CONFIGS
from .parallel import TrainLayout

__all__ = ["TrainRequest", "launch", "torchrun_command"]


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
    """Events file for the monitor."""
    monitor: bool | None = None
    """Probe the collectives; None: on when inject or events is given."""
    extra_args: tuple[str, ...] = ()
    """More worker flags, passed through verbatim (e.g. ("--pp-schedule", "1f1b"))."""

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
                f"({n} rank{'' if n == 1 else 's'}); "
                f"pass --nproc {n} or change the layout"
            )
        return n

    def monitor_on(self) -> bool:
        """--monitor/--no-monitor, defaulting to on when faults or events are asked for."""
        return bool(self.inject or self.events) if self.monitor is None else self.monitor

    def check(self) -> None:
        """Raise RequestError for anything that would fail after launch."""
        self.resolved_nproc()
        if self.model not in CONFIGS:
            raise RequestError(
                f"--model {self.model!r} is unknown; choose one of {', '.join(CONFIGS)}"
            )
        if self.steps < 1 or self.every < 1:
            raise RequestError("--steps and --every must be positive")
        if (self.inject or self.events) and importlib.util.find_spec("elastickit.faults") is None:
            raise RequestError(
                "fault injection is not available in this build; drop --inject/--events"
            )


def torchrun_command(req: TrainRequest, python: str = sys.executable) -> list[str]:
    """The torchrun command line for `req` (standalone rendezvous on a free local port)."""
    req.check()
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(req.resolved_nproc()),
        "-m",
        "elastickit.trainer.worker",
        "--layout",
        str(req.resolved_layout()),
        "--steps",
        str(req.steps),
        "--model",
        req.model,
        "--every",
        str(req.every),
    ]
    if req.ckpt:
        cmd += ["--ckpt", req.ckpt]
    for spec in req.inject:
        cmd += ["--inject", spec]
    if req.events:
        cmd += ["--events", req.events]
    if req.monitor_on():
        # Not `--monitor`: torchrun would take it as an abbreviation of its --monitor-interval.
        cmd.append("--collective-monitor")
    return cmd + list(req.extra_args)


def launch(req: TrainRequest) -> int:
    """Run the job; stream its output; return torchrun's exit code."""
    cmd = torchrun_command(req)
    env = dict(os.environ)
    # Each worker opens its own store client instead of sharing torchrun's rendezvous store:
    # avoids a teardown race of the shared TCPStore on some torch versions.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=env, check=False).returncode
