"""Lightning with `elastickit.integrations.lightning.ElastickitCallback`: a SIGKILL from outside
mid-run, then the same command again, ends bit-exact with an uninterrupted run (1 process, and 2
with the environment torchrun gives its workers, see _kill.Launcher); the checkpoint of the
2-process run also resumes at 1 process (resharded).

The run uses a dataloader with state_dict/load_state_dict, as Lightning needs for an exact
resume in the middle of an epoch (with its own checkpoints as with ours). At 2 processes:
strategy="ddp", and FSDP2 (`ModelParallelStrategy`, `fully_shard` in `configure_model`): the
parameters and the optimizer state are DTensor shards, saved and restored as such and resharded
to plain tensors at 1 process. Lightning's strategy="fsdp" (FSDP1) cannot run here: Lightning
refuses it without a CUDA accelerator ("The strategy `fsdp` requires a GPU accelerator").
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.integrations import _kill

_kill.needs("lightning", "needs the [lightning] extra: pip install 'elastickit[lightning]'")


pytestmark = [pytest.mark.slow]
SCRIPT = os.path.join(os.path.dirname(__file__), "lightning_train.py")


@pytest.fixture(scope="module")
def launcher():
    with _kill.Launcher(SCRIPT, preload=["elastickit.integrations.lightning"]) as la:
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
@pytest.mark.parametrize(("nproc", "strategy"), [(1, None), (2, "ddp"), (2, "fsdp2")])
def test_sigkill_then_rerun_is_bit_exact(launcher, tmp_path, nproc, strategy):
    full, out = str(tmp_path / "full"), str(tmp_path / "cut")
    strategy = ("--strategy", strategy) if strategy else ()
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
