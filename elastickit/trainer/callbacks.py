"""Checkpointing for loops built around callbacks (and for the StepHook list of `run_training`).

    cb = CheckpointCallback("runs/exp1/ckpt", lambda: {"model": model, "optim": opt,
                                                      "data": loader}, every=100)
    start = cb.on_train_start()          # restores; the step to continue from (0 if none)
    for step in range(start + 1, total + 1):
        cb.on_step_start(step)
        ...forward, backward, optimizer.step()...
        cb.on_step_end(step, loss, step_time_s)   # saves when the policy says it is due
    cb.on_train_end()                    # waits until durable, closes

It satisfies the `StepHook` protocol (`on_step_start`, `on_step_end`, `close`), with 1-based
step numbers that equal the number of completed steps at `on_step_end`, as the loop of
`elastickit.trainer.run_training` uses them. `state` may be a mapping or a zero-argument
callable returning one (for loops that build their objects after the callback).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CheckpointCallback"]

StateSource = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


class CheckpointCallback:
    """Restore at train start, save after steps, wait and close at train end.

    Args:
        root: checkpoint root for `elastickit.Checkpointer`.
        state: the state mapping (model, optim, data, extra...) or a callable returning it.
        every: checkpoint interval in steps.
        **checkpointer_kwargs: passed to `elastickit.Checkpointer` (layout, rules, keep_last...).
    """

    def __init__(
        self, root: str, state: StateSource, *, every: int = 1, **checkpointer_kwargs: Any
    ) -> None:
        self.root = root
        self.every = every
        self._state = state
        self._kwargs = checkpointer_kwargs
        self._ck: Any = None
        self.restored_step = 0
        self.last_saved_step: int | None = None

    def _checkpointer(self) -> Any:
        if self._ck is None:
            import elastickit

            self._ck = elastickit.Checkpointer(self.root, every=self.every, **self._kwargs)
        return self._ck

    def state(self) -> Mapping[str, Any]:
        """The current state mapping."""
        return self._state() if callable(self._state) else self._state

    def on_train_start(self) -> int:
        """Restore the newest checkpoint into the state; return its step (0 if none)."""
        self.restored_step = self._checkpointer().restore(self.state())
        return self.restored_step

    def on_step_start(self, step: int) -> None:
        """Nothing (part of StepHook)."""

    def on_step_end(self, step: int, loss: float = float("nan"), step_time_s: float = 0.0) -> None:
        """Checkpoint after step `step` (completed steps) when the policy says it is due."""
        handle = self._checkpointer().save(step, self.state())
        if handle.scheduled:
            self.last_saved_step = step

    def on_train_end(self) -> None:
        """Wait until every checkpoint is durable, then close."""
        self.close()

    def close(self) -> None:
        """Wait for pending saves and release the Checkpointer. Idempotent."""
        if self._ck is not None:
            try:
                self._ck.wait()
            finally:
                self._ck.close()
                self._ck = None
