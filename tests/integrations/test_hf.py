"""The Hugging Face Trainer with `ElastickitCallback`: a SIGKILL from outside mid-run, then the
same command again, ends bit-exact with an uninterrupted run (1 process, and 2: the interrupted
run under torchrun itself, the others with the environment torchrun gives its workers, see
_kill.Launcher); the checkpoint of the 2-process run also resumes at 1 process (resharded).

The loss logged in the first logging window after a resume is left out of the comparison: the
Trainer itself restarts its running loss sum at a resume (it does the same for its own
checkpoints); the model, optimizer and scheduler states, the grad norms and learning rates, and
every later loss must be equal bit for bit.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.integrations import _kill

_kill.needs("transformers", "needs the [hf] extra: pip install 'elastickit[hf]'")
_kill.needs("accelerate", "needs the [hf] extra: pip install 'elastickit[hf]'")


pytestmark = [pytest.mark.slow]
SCRIPT = os.path.join(os.path.dirname(__file__), "hf_train.py")
LOG_EVERY = 3


@pytest.fixture(scope="module")
def launcher():
    with _kill.Launcher(SCRIPT, preload=["elastickit.integrations.hf", "deepspeed?"]) as la:
        yield la


def _args(out: str, *extra: str) -> tuple[str, ...]:
    return ("--out", out, "--root", os.path.join(out, "ck"), *extra)


def _same_final(full: str, cut: str, nproc: int, resumed_at: int) -> None:
    for r in range(nproc):
        a = torch.load(os.path.join(full, f"final-{r}.pt"))
        b = torch.load(os.path.join(cut, f"final-{r}.pt"))
        logs_a, logs_b = a.pop("logs"), b.pop("logs")
        _kill.assert_same(a, b, f"rank {r}")
        assert [e["step"] for e in logs_a] == [e["step"] for e in logs_b]
        for ea, eb in zip(logs_a, logs_b, strict=True):
            if ea["step"] - LOG_EVERY < resumed_at < ea["step"]:  # the window the resume cut in two
                ea, eb = dict(ea), dict(eb)
                del ea["loss"], eb["loss"]
            assert ea == eb, f"rank {r}: log {ea} != {eb}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_rerun_is_bit_exact(launcher, tmp_path, nproc):
    full, out = str(tmp_path / "full"), str(tmp_path / "cut")
    launcher.run(nproc, *_args(full, "--dump-at", "4"), logs=full)
    # Step 4 is mid-epoch at both world sizes (6 and 3 optimizer steps per epoch).
    committed = launcher.run_and_kill(nproc, out, os.path.join(out, "ck"), wait_step=4,
                                      args=_args(out, "--block-at", "5"), torchrun=nproc == 2)
    assert committed[-1] == 4
    assert not os.path.exists(os.path.join(out, "final-0.pt"))
    if nproc == 2:
        shutil.copytree(os.path.join(out, "ck"), str(tmp_path / "one" / "ck"))
    launcher.run(nproc, *_args(out), logs=out)
    for r in range(nproc):
        assert torch.load(os.path.join(out, f"begin-{r}.pt"))["global_step"] == 4
    _same_final(full, out, nproc, resumed_at=4)
    assert _kill.committed(os.path.join(out, "ck"))[-1] == 10  # the last step is always saved
    if nproc == 2:  # the same checkpoint at world size 1
        one = str(tmp_path / "one")
        launcher.run(1, *_args(one), logs=one)
        begin = torch.load(os.path.join(one, "begin-0.pt"))
        assert begin["global_step"] == 4
        _kill.assert_same(torch.load(os.path.join(full, "step4-0.pt"))["model"], begin["model"], "model at step 4")
        assert torch.load(os.path.join(one, "final-0.pt"))["global_step"] == 10
