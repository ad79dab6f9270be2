"""`SaveHandle`: what `Checkpointer.save` returns."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveHandle:
    """What `save` returns: one handle, whether or not a checkpoint is taken at this step.

    Attributes:
        step: the step asked for.
        scheduled: whether a checkpoint is taken (False: not due, or skipped; see `reason`).
        staged: done when the snapshot is copied (the tensors may change from then on).
        durable: done when every file tier committed it or a newer checkpoint (a tier that is
            busy skips to the newest); its result is the most durable path it reached
            (persistent, else local, else "memory"), or it raises the error.
        reason: why no checkpoint was taken, when `scheduled` is False.
    """

    step: int
    scheduled: bool
    staged: Future[None]
    durable: Future[str]
    reason: str = ""

    @classmethod
    def not_taken(cls, step: int, reason: str) -> SaveHandle:
        return cls(step=step, scheduled=False, staged=_done(), durable=_done(""), reason=reason)


def _done(value: Any = None) -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(value)
    return f
