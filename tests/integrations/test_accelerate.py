"""Accelerate with `elastickit.integrations.accelerate.install`: a SIGKILL from outside mid-run,
then the same command again, ends bit-exact with an uninterrupted run (1 process, and 2 with the
environment torchrun gives its workers, see _kill.Launcher); the checkpoint of the 2-process run
also loads at 1 process (resharded).

The loop is written as Accelerate's examples write it: `load_state()` at start, the position kept
in an object registered for checkpointing, `skip_first_batches`, `save_state()` every step.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.integrations import _kill

_kill.needs("accelerate", "needs the [accelerate] extra: pip install 'elastickit[accelerate]'")


pytestmark = [pytest.mark.slow]
SCRIPT = os.path.join(os.path.dirname(__file__), "accelerate_train.py")


@pytest.fixture(scope="module")
def launcher():
    with _kill.Launcher(SCRIPT, preload=["elastickit.integrations.accelerate", "deepspeed?"]) as la:
        yield la


def _args(out: str, *extra: str) -> tuple[str, ...]:
    return ("--out", out, "--root", os.path.join(out, "ck"), *extra)


def _same_final(full: str, cut: str, nproc: int, resumed_at: int) -> None:
    for r in range(nproc):
        a = torch.load(os.path.join(full, f"final-{r}.pt"))
        b = torch.load(os.path.join(cut, f"final-{r}.pt"))
        seen_a, seen_b = a.pop("seen"), b.pop("seen")
        _kill.assert_same(a, b, f"rank {r}")
        # The batches and the dropout draws of every step after the resume are the same.
        assert seen_b and seen_b[0][0] == resumed_at and seen_a[-len(seen_b):] == seen_b


@pytest.mark.timeout(600)
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_rerun_is_bit_exact(launcher, tmp_path, nproc):
    full, out = str(tmp_path / "full"), str(tmp_path / "cut")
    strategy = ()
    launcher.run(nproc, *_args(full, "--dump-at", "4", *strategy), logs=full)
    # Step 4 is mid-epoch at both world sizes (6 and 3 optimizer steps per epoch).
    committed = launcher.run_and_kill(nproc, out, os.path.join(out, "ck"), wait_step=4,
                                      args=_args(out, "--block-at", "5", *strategy))
    assert committed[-1] == 4
    assert not os.path.exists(os.path.join(out, "final-0.pt"))
    if nproc == 2:
        shutil.copytree(os.path.join(out, "ck"), str(tmp_path / "one" / "ck"))
    launcher.run(nproc, *_args(out, *strategy), logs=out)
    for r in range(nproc):
        assert torch.load(os.path.join(out, f"begin-{r}.pt"))["step"] == 4
    _same_final(full, out, nproc, resumed_at=4)
    assert _kill.committed(os.path.join(out, "ck"))[-1] == 10  # the last step is always saved
    if nproc == 2:  # the same checkpoint at world size 1
        one = str(tmp_path / "one")
        launcher.run(1, *_args(one), logs=one)
        begin = torch.load(os.path.join(one, "begin-0.pt"))
        # (the loop's own step count follows its position in the data, which depends on the world size)
        _kill.assert_same(torch.load(os.path.join(full, "step4-0.pt"))["model"], begin["model"], "model at step 4")
        assert torch.load(os.path.join(one, "final-0.pt"))["steps"] == 10


def test_save_state_does_not_unwrap_on_the_training_thread(tmp_path, monkeypatch):
    # accelerate's unwrap_model imports DeepSpeed the first time where it is installed (2 s on
    # a loaded machine): install() unwraps each prepared model once, save_state never does.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from elastickit.integrations.accelerate import install

    acc = Accelerator(cpu=True)
    try:
        net = torch.nn.Linear(4, 2)
        model, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
        state = install(acc, str(tmp_path / "ck"))

        def unwrap(*_a, **_k):
            raise AssertionError("unwrap_model called by save_state")

        monkeypatch.setattr(acc, "unwrap_model", unwrap)
        acc.backward(model(torch.ones(3, 4)).sum())
        opt.step()
        acc.save_state()
        state.close()
        assert _kill.committed(str(tmp_path / "ck")) == [1]
    finally:
        AcceleratorState._reset_state(True)
