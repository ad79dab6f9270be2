"""`elastickit train` end to end: torchrun starts the ranks, rank 0 prints each step."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(180)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "elastickit.cli.main", "train", *args],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        check=False,
    )


def test_train_prints_steps_and_resumes_from_its_checkpoint(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    first = _cli("--layout", "dp=2", "--steps", "4", "--ckpt", ckpt, "--every", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    lines = re.findall(
        r"^step (\d+)/4  loss ([0-9.]+)  step_time ([0-9.]+) s$", first.stdout, re.MULTILINE
    )
    assert [int(s) for s, _, _ in lines] == [1, 2, 3, 4], first.stdout
    assert "layout dp=2 on 2 rank(s)" in first.stdout
    again = _cli("--layout", "tp=2", "--steps", "6", "--ckpt", ckpt, "--every", "2")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert re.findall(r"^step (\d+)/6", again.stdout, re.MULTILINE) == ["5", "6"]
    assert "(resumed from step 4)" in again.stdout, again.stdout


def test_train_rejects_a_bad_request_with_exit_2() -> None:
    bad = _cli("--layout", "dp=2,tp=2", "--nproc", "3")
    assert bad.returncode == 2
    assert "--nproc 3 does not match --layout dp=2,tp=2 (4 ranks)" in bad.stderr
    assert "Traceback" not in bad.stderr
