"""Run a job (torchrun and its workers) so that it never outlives the command that started it.

    result = run_job(cmd, env=env, log_path="ckpt/train.log")

The job runs in its own session, so a Ctrl-C at the terminal reaches this process only, which
then stops the job in order: SIGTERM to torchrun's process group (torchrun forwards it to its
workers and waits for them), a bounded grace, then SIGKILL to every process of the job. A
second Ctrl-C kills at once. torchrun starts each worker in a session of its own, so a process
group is not enough to find them all; every process of the job carries a token in its
environment (`ELASTICKIT_JOB`), and the final sweep kills whatever still carries it, even a
worker whose torchrun is gone (Linux /proc; elsewhere torchrun's own shutdown is relied on).
torchrun is also told to die with this process (PR_SET_PDEATHSIG), should it be killed itself.

The job's stdout is passed through (rank 0's step lines); its stderr, where torchrun and every
rank write their warnings and tracebacks, goes to the log file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence

__all__ = ["JOB_ENV", "JobResult", "job_processes", "run_job"]

JOB_ENV = "ELASTICKIT_JOB"
"""Environment variable every process of a job inherits: the job's token."""

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class JobResult:
    """How a job ended."""

    returncode: int
    """torchrun's exit code (negative: the signal that killed it)."""
    stopped_by: int | None
    """The signal this process received and acted on by stopping the job (None: the job
    ended by itself)."""
    killed: tuple[int, ...]
    """Processes of the job that had to be killed with SIGKILL after the grace."""
    log_path: str
    """Where the job's stderr went."""
    log_offset: int
    """Byte offset in the log where this job's output starts."""
    started_s: float
    """Unix time when the job started."""


def job_processes(token: str) -> list[int]:
    """Pids of the live processes whose environment carries `JOB_ENV=token` (Linux /proc;
    an empty list elsewhere). Zombies are left out: they are dead, only not yet reaped."""
    needle = f"{JOB_ENV}={token}".encode()
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    pids = []
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state not in (b"Z", b"X"):
            pids.append(int(name))
    return sorted(pids)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG: this process's death stops it
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _signals_forwarded(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM/SIGHUP to `on_signal(signum)` meanwhile (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        s: signal.signal(s, lambda signum, _frame: on_signal(signum)) for s in _STOP_SIGNALS
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _kill_all(proc: subprocess.Popen[bytes], token: str) -> set[int]:
    """SIGKILL torchrun's group and every live process that carries the job's token."""
    killed = set()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
            killed.add(proc.pid)
    for _ in range(3):  # a process may fork while we look: look again
        pids = job_processes(token)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
    return killed


def run_job(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: str,
    grace_s: float = 45.0,
    header: str = "",
) -> JobResult:
    """Run `cmd` as a job (see the module docstring); return when no process of it is left.

    Call from the main thread (signals are only delivered there; elsewhere the caller must
    stop the job itself). `grace_s` bounds the wait after a stop signal before SIGKILL; it is
    longer than torchrun's own 30 s shutdown timeout so that torchrun normally stops its
    workers itself.
    """
    token = uuid.uuid4().hex
    stop: dict[str, float | int] = {}
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "ab") as log:
        if header:
            log.write(header.encode() + b"\n")
            log.flush()
        offset = log.tell()
        started = time.time()
        proc: subprocess.Popen[bytes] | None = None

        def on_signal(signum: int) -> None:
            if "signal" in stop:  # the second one: no more grace
                stop["now"] = 1
            else:
                stop["signal"], stop["at"] = signum, time.monotonic()
            if proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL if "now" in stop else signal.SIGTERM)

        killed: set[int] = set()
        # The handlers go in before the job starts: a signal in between must not orphan it.
        with _signals_forwarded(on_signal):
            proc = subprocess.Popen(
                list(cmd),
                env={**env, JOB_ENV: token},
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
            )
            if "signal" in stop:  # it came while the job was starting
                on_signal(int(stop.pop("signal")))
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if "now" in stop or ("at" in stop and time.monotonic() - stop["at"] > grace_s):
                    killed |= _kill_all(proc, token)
            # torchrun is gone. A worker it failed to stop, or a worker of a torchrun that was
            # killed, would go on training and writing checkpoints: none may outlive the job.
            killed |= _kill_all(proc, token)
            proc.wait()
    return JobResult(
        returncode=proc.returncode,
        stopped_by=int(stop["signal"]) if "signal" in stop else None,
        killed=tuple(sorted(killed)),
        log_path=log_path,
        log_offset=offset,
        started_s=started,
    )
