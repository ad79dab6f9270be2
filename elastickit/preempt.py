"""SIGTERM, a scheduler's preemption notice: save the last step trained, durably, then exit.

Schedulers (Kubernetes, SLURM with --signal, cloud spot reclaim) send SIGTERM and kill the
process a grace period later (Kubernetes and SLURM's KillWait default to 30 s). With
`Checkpointer(..., sigterm_grace_s=G)`, the handler only notes the signal (a handler runs between
two bytecodes of the training thread: no collective, no file I/O may start there); the tiers stop
resting at once, and the training loop's next `save` call decides:

- one rank: the step of that call (the last step trained) is saved at once;
- many ranks: the first rank to see the signal at `save(s)` sets the store key `<job>/sigterm`
  to s + 1 (compare-and-set: the first writer wins), and every rank's `save` reads that key. Any
  rank still before save(s + 1) reads it in time, since no rank finishes step s + 1 before that
  rank's collective of step s + 1 (ranks train in lockstep: data parallelism reduces gradients
  every step), and that collective comes after the key was set. Every rank then saves step s + 1,
  the last step any of them trains.

That save is made durable on every tier (`close()`), an event records it, and the signal is
delivered again with the handler that was there before (by default: the process ends as it
would have, with SIGTERM). A watchdog ends the process when the grace period runs out first (a
training thread stuck in a collective whose peers are gone), saying which step is durable.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from elastickit.checkpoint.errors import RequestError

log = logging.getLogger("elastickit")

H = TypeVar("H")


def check_grace(grace_s: Any) -> None:
    """Refuse a `sigterm_grace_s` that is not a positive number, in one sentence."""
    if grace_s is not None and not (isinstance(grace_s, (int, float)) and grace_s > 0):
        raise RequestError(f"sigterm_grace_s must be a positive number of seconds, got {grace_s!r}")


def install_sigterm(
    grace_s: float | None,
    *,
    world_size: int,
    key: str,
    flush: Callable[[], None],
    newest_durable: Callable[[], int | None],
) -> SigtermSaver | None:
    """A `SigtermSaver` holding SIGTERM for a Checkpointer (None when `grace_s` is None)."""
    if grace_s is None:
        return None
    store = None
    if world_size > 1:
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
    saver = SigtermSaver(grace_s, store=store, key=key, flush=flush, newest_durable=newest_durable)
    saver.install()
    return saver


class SigtermSaver:
    """Turns SIGTERM into one last durable save (see the module docstring).

    Args:
        grace_s: how long after the signal the process may live (the scheduler's grace period,
            less a margin for the process to exit).
        store: the job's c10d store (None for one rank).
        key: the store key the ranks agree through (unique to this job incarnation).
        flush: asks the tiers to write the newest snapshot now, without resting.
        newest_durable: the newest durable step, for the watchdog's last word.
    """

    def __init__(
        self,
        grace_s: float,
        *,
        store: Any,
        key: str,
        flush: Callable[[], None],
        newest_durable: Callable[[], int | None],
    ) -> None:
        if not grace_s > 0:
            raise ValueError(
                f"sigterm_grace_s must be a positive number of seconds, got {grace_s!r}"
            )
        self.grace_s = float(grace_s)
        self.store = store
        self.key = key
        self._flush = flush
        self._newest = newest_durable
        self.signalled_at: float | None = None  # time.monotonic() of the first SIGTERM
        self.target: int | None = None  # the step every rank saves before exiting
        self._done = threading.Event()
        self._previous: Any = None
        self._installed = False

    def install(self) -> bool:
        """Take over SIGTERM (main thread only); False, with a warning, where it cannot."""
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "elastickit: sigterm_grace_s needs the Checkpointer to be made on the main thread "
                "(only it can handle signals); SIGTERM will end this process without a last save"
            )
            return False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Give SIGTERM back to the handler that was there before (main thread only)."""
        if self._installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == self._on_signal:
                signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signalled_at is not None:
            return  # a second notice changes nothing
        self.signalled_at = time.monotonic()
        threading.Thread(target=self._watchdog, name="elastickit-sigterm", daemon=True).start()
        self._flush()

    def stop_at(self, step: int) -> int | None:
        """At `save(step)`: the step to save before exiting, once known (None: go on)."""
        if self.target is not None:
            return self.target
        if self.store is None:
            if self.signalled_at is not None:
                self.target = step
            return self.target
        if self.signalled_at is not None:
            got = self.store.compare_set(self.key, "", str(step + 1))
            self.target = int(got)
        elif self.store.check([self.key]):
            self.target = int(self.store.get(self.key))
            if self.signalled_at is None:  # another rank was told: this one stops with it
                self._flush()
        return self.target

    def save(
        self,
        step: int,
        save: Callable[[bool], H],
        *,
        force: bool,
        close: Callable[[], None],
        emit: Callable[..., Any],
    ) -> H:
        """`Checkpointer.save(step)` under this guard: `save(force)` takes the checkpoint; once
        the ranks agreed on the step to stop at, that step is forced, made durable, and the
        process exits (this never returns then)."""
        stop = self.stop_at(step)
        if stop is None:
            return save(force)
        if step > stop:  # cannot happen while the ranks train in lockstep; save what there is
            log.warning("elastickit: SIGTERM: the ranks agreed to save step %d, but this one is at %d", stop, step)
        handle = save(force or step >= stop)
        if step >= stop:
            self.exit(step, close, emit)
        return handle

    def exit(self, step: int, close: Callable[[], None], emit: Callable[..., Any]) -> None:
        """After saving `step`: make it durable (close), record it, and let the signal go on."""
        t0 = self.signalled_at if self.signalled_at is not None else time.monotonic()
        error = ""
        try:
            close()
        except Exception as e:  # noqa: BLE001 - said below; the process exits either way
            error = str(e)
            log.error("elastickit: SIGTERM: %s", e)
        seconds = round(time.monotonic() - t0, 3)
        emit(
            "sigterm",
            step=step,
            seconds=seconds,
            grace_s=self.grace_s,
            **({"error": error} if error else {}),
        )
        log.warning(
            "elastickit: SIGTERM: step %d saved%s %.2f s after the signal; exiting",
            step,
            "" if error else " durably",
            seconds,
        )
        self._done.set()
        previous = self._previous
        self.uninstall()
        if self.signalled_at is None:
            # Another rank was signalled: this one leaves with it, as a preempted job does.
            raise SystemExit(128 + signal.SIGTERM)
        if previous == signal.SIG_IGN:
            return
        signal.raise_signal(signal.SIGTERM)  # the previous handler, or the default: the end
        raise SystemExit(128 + signal.SIGTERM)  # a previous Python handler that returned

    def _watchdog(self) -> None:
        assert self.signalled_at is not None
        if self._done.wait(max(0.0, self.signalled_at + self.grace_s - time.monotonic())):
            return
        newest = self._newest()
        log.error(
            "elastickit: SIGTERM: no save reached the agreed step within sigterm_grace_s=%.1f s "
            "(is the training loop stuck, or does it call save only now and then?); exiting; "
            "the newest durable checkpoint is %s",
            self.grace_s,
            f"step {newest}" if newest is not None else "none",
        )
        for h in logging.getLogger("elastickit").handlers + logging.getLogger().handlers:
            h.flush()
        os._exit(128 + signal.SIGTERM)
