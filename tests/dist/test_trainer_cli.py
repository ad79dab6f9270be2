"""`elastickit train` end to end: torchrun starts the ranks, rank 0 prints each step; a bad
request ends in one sentence before launch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from elastickit.checkpoint.catalog import list_checkpoints

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(240)]

CLI = [sys.executable, "-m", "elastickit.cli.main", "train"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=200, env=_env(), check=False, **kwargs
    )


def _committed(ckpt: str) -> list[int]:
    return [c.step for c in list_checkpoints(ckpt) if c.complete]


def test_train_prints_steps_and_resumes_from_its_checkpoint(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    first = _cli("--layout", "dp=2", "--steps", "4", "--ckpt", ckpt, "--every", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    lines = re.findall(
        r"^step (\d+)/4  loss ([0-9.]+)  step_time ([0-9.]+) s$", first.stdout, re.MULTILINE
    )
    assert [int(s) for s, _, _ in lines] == [1, 2, 3, 4], first.stdout
    assert "layout dp=2 on 2 ranks" in first.stdout
    again = _cli("--layout", "tp=2", "--steps", "6", "--ckpt", ckpt, "--every", "2")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert re.findall(r"^step (\d+)/6", again.stdout, re.MULTILINE) == ["5", "6"]
    assert "(resumed from step 4)" in again.stdout, again.stdout


def test_train_rejects_a_bad_request_with_exit_2(tmp_path) -> None:
    bad = _cli("--layout", "dp=2,tp=2", "--nproc", "3")
    assert bad.returncode == 2
    assert "--nproc 3 does not match --layout dp=2,tp=2 (4 ranks)" in bad.stderr
    assert "Traceback" not in bad.stderr
    # Found before launch, not by every rank after it: one sentence, exit 2.
    # (the unit tests go through every other option)
    r = _cli("--layout", "tp=3")
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.startswith("error: --layout tp=3: model tiny has 4 attention heads")
    assert r.stderr.count("\n") == 1, r.stderr


def test_train_refuses_a_checkpoint_of_another_model(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    assert _cli("--steps", "2", "--ckpt", ckpt, "--every", "2").returncode == 0
    r = _cli("--model", "tiny-moe", "--layout", "dp=2", "--ckpt", ckpt)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        f"error: --ckpt {ckpt}: its checkpoint of step 2 holds another model: "
    ), r.stderr
    assert r.stderr.rstrip().endswith("pass --model tiny, or another --ckpt")


def _unprivileged() -> list[str]:
    """A command prefix that runs as a user who cannot write a 0o555 directory (root can)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a directory unwritable")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import elastickit.trainer.launch"],
        capture_output=True, env=_env(), cwd=tempfile.gettempdir(), check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot run this Python as user nobody: {probe.stderr.decode()[-300:]}")
    return prefix


def test_train_refuses_a_read_only_checkpoint_root_before_launch() -> None:
    prefix = _unprivileged()
    base = tempfile.mkdtemp(prefix="ek-ro-")  # not under pytest's 0o700 tmp: nobody must reach it
    ro = os.path.join(base, "ckpt")
    try:
        os.chmod(base, 0o755)
        os.mkdir(ro)
        os.chmod(ro, 0o555)
        r = subprocess.run(
            [*prefix, *CLI, "--layout", "dp=2", "--steps", "3", "--ckpt", ro, "--every", "1"],
            capture_output=True, text=True, timeout=200, env=_env(), cwd=base, check=False,
        )
        assert (r.returncode, r.stdout) == (2, ""), r.stdout + r.stderr
        assert r.stderr == (
            f"error: --ckpt {ro} cannot be written (Permission denied); pass a writable directory\n"
        )
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(base)
