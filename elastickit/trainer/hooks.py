"""The step-hook seam: what the training loop calls around every step.

The loop calls, for every hook in its list and in list order:
`on_step_start(step)` before the step's first forward, `on_step_end(step, loss, step_time_s)`
after the optimizer step, and `close()` once when the loop ends (also on an exception).
`step` is 1-based: the number the step will have once it is done, the same number that
`Checkpointer.save(step, ...)` receives. Fault injection (`elastickit.faults`) and the monitor
plug in here; a hook may sleep, raise or exit to simulate a fault.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol, TextIO, runtime_checkable

__all__ = ["PrintHook", "StepHook", "call_close", "call_step_end", "call_step_start"]


@runtime_checkable
class StepHook(Protocol):
    """Called by the training loop around every step (see the module docstring)."""

    def on_step_start(self, step: int) -> None:
        """Before step `step` (1-based) begins."""

    def on_step_end(self, step: int, loss: float, step_time_s: float) -> None:
        """After step `step`: its global mean loss and its wall time in seconds."""

    def close(self) -> None:
        """Once, when the loop ends."""


class PrintHook:
    """Prints `step N/T  loss L  step_time S s` (on the rank that owns it)."""

    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.stream = stream

    def on_step_start(self, step: int) -> None:
        """Nothing."""

    def on_step_end(self, step: int, loss: float, step_time_s: float) -> None:
        """One line per step, flushed (torchrun pipes stdout)."""
        out = self.stream if self.stream is not None else sys.stdout
        print(
            f"step {step}/{self.total_steps}  loss {loss:.6f}  step_time {step_time_s:.3f} s",
            file=out,
            flush=True,
        )

    def close(self) -> None:
        """Nothing."""


def call_step_start(hooks: Sequence[StepHook], step: int) -> None:
    """Call every hook's on_step_start in order."""
    for hook in hooks:
        hook.on_step_start(step)


def call_step_end(hooks: Sequence[StepHook], step: int, loss: float, step_time_s: float) -> None:
    """Call every hook's on_step_end in order."""
    for hook in hooks:
        hook.on_step_end(step, loss, step_time_s)


def call_close(hooks: Sequence[StepHook]) -> None:
    """Close every hook; the first error is raised after all were closed."""
    first: BaseException | None = None
    for hook in hooks:
        try:
            hook.close()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            first = first or e
    if first is not None:
        raise first
