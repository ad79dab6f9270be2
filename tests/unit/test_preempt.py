"""SIGTERM with `Checkpointer(sigterm_grace_s=...)` in one process (issue 17 item 6; the
two-rank version is tests/torture/test_sigterm.py): the next save writes the step just trained,
durably, and the process then dies by SIGTERM; a loop that never saves again is ended by the
watchdog at the grace period, naming the newest durable step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from elastickit.checkpoint.errors import RequestError

import elastickit as ek

pytestmark = pytest.mark.timeout(120)

TRAIN = r"""
import os, signal, sys, time, torch
import elastickit as ek
root, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
m = torch.nn.Linear(4, 4)
ck = ek.Checkpointer(root, every=100, sigterm_grace_s=float(sys.argv[3]))
for step in range(1, 1000):
    with torch.no_grad():
        m.weight.add_(1.0)
    open(os.path.join(root, "trained"), "w").write(str(step))
    if mode == "stuck" and step == 3:
        ck.save(step, {"model": m}, force=True); ck.wait()  # a durable step 3
    if step == 5:
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice, mid-step
        if mode == "stuck":
            time.sleep(60)  # the loop hangs (a collective whose peers are gone) and never saves
    ck.save(step, {"model": m})
print("never here", flush=True)
"""


def _run(root, mode: str, grace: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", TRAIN, str(root), mode, str(grace)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def _events(root) -> list[dict]:
    with open(os.path.join(root, "events.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_sigterm_saves_the_step_just_trained_and_dies_by_the_signal(tmp_path):
    got = _run(tmp_path, "train", 30)
    assert got.returncode == -signal.SIGTERM, got.stderr[-2000:]
    assert "never here" not in got.stdout and "Traceback" not in got.stderr
    assert (tmp_path / "trained").read_text() == "5"
    assert (tmp_path / "step-00000005" / "manifest.json").exists()  # not a due step (every=100)
    assert [e["step"] for e in _events(tmp_path) if e["type"] == "sigterm"] == [5]
    import torch

    torch.manual_seed(0)
    want = torch.nn.Linear(4, 4).weight.detach().clone()
    for _ in range(5):
        want.add_(1.0)  # as the job trained it, step by step
    m = torch.nn.Linear(4, 4)
    with ek.Checkpointer(str(tmp_path)) as ck:
        assert ck.restore({"model": m}) == 5
    assert torch.equal(m.weight.detach(), want)  # the state of the step trained last


def test_a_loop_that_never_saves_again_is_ended_at_the_grace_period(tmp_path):
    got = _run(tmp_path, "stuck", 2)
    assert got.returncode == 128 + signal.SIGTERM, got.stderr[-2000:]
    assert "no save reached the agreed step within sigterm_grace_s=2.0 s" in got.stderr
    assert "the newest durable checkpoint is step 3" in got.stderr


@pytest.mark.parametrize("bad", [0, -1, "30", float("nan")])
def test_a_bad_grace_period_is_one_sentence(tmp_path, bad):
    with pytest.raises(RequestError, match="sigterm_grace_s must be a positive number of seconds"):
        ek.Checkpointer(str(tmp_path), sigterm_grace_s=bad)
