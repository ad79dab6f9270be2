"""Run a training script, SIGKILL it from outside once it is stopped mid-run, and collect results.

The scripts (hf_train.py, lightning_train.py, accelerate_train.py) take `--block-at K`: at step K
every rank writes `<out>/blocked-<rank>` and waits (a stand-in for a long step), so that the
kill lands mid-run, after the committed checkpoint the test waits for, at a known step. Each
rank writes its pid to `<out>/pid-<rank>`.

`Launcher` starts runs as forks of a preloaded interpreter (`_zygote.py`: the imports of torch
and the framework are paid once per test module, not once per process) with the environment
torchrun gives its workers, or, with `torchrun=True`, under torchrun itself (the kill then goes
to every worker and to the launcher: torchrun starts workers in a session of their own, so
killing its group alone would orphan them).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zygote.py")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["TOKENIZERS_PARALLELISM"] = "false"
    e["HF_HUB_OFFLINE"] = "1"
    e["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    e.setdefault("DS_ACCELERATOR", "cpu")
    # pyarrow (imported by transformers where `datasets` is installed, as the [torchtitan] extra
    # does) starts jemalloc's background thread; the zygote forks only when single-threaded.
    e.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    return e


def needs(module: str, reason: str) -> None:
    """Skip the calling test module unless `module` is installed (without importing it here:
    the runs import it, in their own processes)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(reason, allow_module_level=True)


def committed(root: str) -> list[int]:
    return sorted(int(os.path.basename(d)[5:]) for d in glob.glob(os.path.join(root, "step-*"))
                  if os.path.exists(os.path.join(d, "manifest.json")))


def _logs(folder: str) -> str:
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "log-*.txt"))):
        with open(path, errors="replace") as f:
            parts.append(f"--- {os.path.basename(path)}\n{f.read()[-5000:]}")
    return "\n".join(parts)


def _gone(pid: int) -> bool:
    """Whether `pid` has ended (a zombie until the zygote reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@dataclass(frozen=True, slots=True)
class _Run:
    pids: list[int]
    agent: int | None
    logs: str


class Launcher:
    """Runs `script` at 1 or more processes, forked from one preloaded interpreter.

    `preload`: modules the script imports inside `main()` (elastickit's integration), imported
    once in the zygote as well. Close it (or use it as a context manager) to end the zygote.
    """

    def __init__(self, script: str, preload: Sequence[str] = ()) -> None:
        self.script = script
        self._err = tempfile.NamedTemporaryFile(prefix="ek-zygote-", suffix=".txt", delete=False)  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen([sys.executable, ZYGOTE, script, *preload], env=env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, start_new_session=True)
        self._ask(None)  # the "ready" line

    def _ask(self, req: dict | None) -> dict:
        if req is not None:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            with open(self._err.name, errors="replace") as f:
                raise AssertionError(f"the zygote for {self.script} ended ({self.proc.returncode}):\n{f.read()[-6000:]}")
        return json.loads(line)

    def start(self, nproc: int, args: Sequence[str], logs: str) -> _Run:
        got = self._ask({"op": "run", "nproc": nproc, "args": list(args), "logs": logs})
        return _Run(pids=got["pids"], agent=got["agent"], logs=logs)

    def wait(self, run: _Run, timeout_s: float) -> list[int | str]:
        return self._ask({"op": "wait", "pids": run.pids, "agent": run.agent, "timeout_s": timeout_s})["codes"]

    def run(self, nproc: int, *args: str, logs: str, timeout_s: float = 240) -> None:
        """Run to the end; raise with the ranks' logs unless every rank exits 0."""
        run = self.start(nproc, args, logs)
        codes = self.wait(run, timeout_s)
        if any(c != 0 for c in codes):
            raise AssertionError(f"{self.script} {' '.join(args)} at {nproc} process(es) failed {codes}:\n{_logs(logs)}")

    def run_and_kill(self, nproc: int, out: str, root: str, *, wait_step: int, args: Sequence[str],
                     torchrun: bool = False, timeout_s: float = 240) -> list[int]:
        """Start the script, wait until every rank is blocked and `wait_step` is the newest step
        committed on the persistent tier (a busy tier skips to the newest snapshot), SIGKILL every
        process of the run from here, return the committed steps."""
        os.makedirs(out, exist_ok=True)
        if torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   self.script, *args]
            log = open(os.path.join(out, "log-torchrun.txt"), "w")  # noqa: SIM115 (closed below)
            proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            ended = lambda: proc.poll() is not None
        else:
            run = self.start(nproc, args, out)
            ended = lambda: any(_gone(pid) for pid in run.pids)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                blocked = all(os.path.exists(os.path.join(out, f"blocked-{r}")) for r in range(nproc))
                done = committed(root)
                if blocked and done and done[-1] == wait_step:
                    break
                if ended() or time.monotonic() > deadline:
                    raise AssertionError(f"{self.script} {' '.join(args)}: not blocked with step {wait_step} committed "
                                         f"(committed: {committed(root)}):\n{_logs(out)}")
                time.sleep(0.05)
        finally:
            pids = [] if torchrun else [*run.pids, run.agent]
            for r in range(nproc):
                try:
                    with open(os.path.join(out, f"pid-{r}")) as f:
                        pids.append(int(f.read()))
                except (FileNotFoundError, ValueError):
                    pass
            for pid in pids:
                try:
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if torchrun:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
                log.close()
            else:
                self.wait(run, 30)
        for r in range(nproc):
            os.remove(os.path.join(out, f"blocked-{r}"))
        return committed(root)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc.stdout.close()
        self._err.close()
        os.remove(self._err.name)

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assert_same(a: dict, b: dict, what: str = "") -> None:
    """Bit-exact equality of two nested results (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b), f"{what} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{what}: keys {sorted(a, key=str)} != {sorted(b, key=str)}"
        for k in a:
            assert_same(a[k], b[k], f"{what}/{k}")
        return
    if isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{what}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{what}/{i}")
        return
    assert a == b, f"{what}: {a!r} != {b!r}"
