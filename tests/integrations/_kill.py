"""Run a training script, SIGKILL it from outside once it is stopped mid-run, and collect results.

The scripts (hf_train.py, lightning_train.py, accelerate_train.py) take `--block-at K`: at step K
every rank writes `<out>/blocked-<rank>` and waits (a stand-in for a long step), so that the
kill lands mid-run, after the committed checkpoint the test waits for, at a known step. Each
rank writes its pid to `<out>/pid-<rank>`; the kill goes to every worker and to the launcher
(torchrun starts workers in a session of their own, so killing its group alone would orphan them).
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import torch


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["TOKENIZERS_PARALLELISM"] = "false"
    e["HF_HUB_OFFLINE"] = "1"
    e["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    e["PYTHONPATH"] = root + os.pathsep + e.get("PYTHONPATH", "")
    return e


def command(script: str, nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            script, *args]


def run(script: str, nproc: int, *args: str, timeout_s: float = 240) -> str:
    cmd = command(script, nproc, *args)
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout


def committed(root: str) -> list[int]:
    return sorted(int(os.path.basename(d)[5:]) for d in glob.glob(os.path.join(root, "step-*"))
                  if os.path.exists(os.path.join(d, "manifest.json")))


def run_and_kill(script: str, nproc: int, out: str, root: str, *, wait_step: int, args: tuple[str, ...],
                 timeout_s: float = 240) -> list[int]:
    """Start the script, wait until every rank is blocked and `wait_step` is the newest step
    committed on the persistent tier (a busy tier skips to the newest snapshot), SIGKILL every process of the run, return the committed steps."""
    cmd = command(script, nproc, *args)
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            blocked = all(os.path.exists(os.path.join(out, f"blocked-{r}")) for r in range(nproc))
            done = committed(root)
            if blocked and done and done[-1] == wait_step:
                break
            if proc.poll() is not None:
                raise AssertionError(f"{' '.join(cmd)} ended ({proc.returncode}) before it was killed:\n"
                                     f"{proc.stdout.read()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{' '.join(cmd)}: not blocked with step {wait_step} committed after "
                                     f"{timeout_s:.0f} s (committed: {committed(root)})")
            time.sleep(0.1)
    finally:
        for r in range(nproc):
            try:
                with open(os.path.join(out, f"pid-{r}")) as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        proc.stdout.close()
    for r in range(nproc):
        os.remove(os.path.join(out, f"blocked-{r}"))
    return committed(root)


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
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}/{i}")
        return
    assert a == b, f"{what}: {a!r} != {b!r}"
