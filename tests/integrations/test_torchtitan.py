"""Real torchtitan 0.3.0 runs: through elastickit's conversions, and with elastickit as their
checkpointer.

torchtitan's own components (llama3 debug model under FSDP2 on 2 CPU ranks, its optimizer and
scheduler containers, its dataloader with per-rank pickled state, its DCP CheckpointManager and
train state; `torchtitan_train.py`) save a DCP checkpoint at step 4; `elastickit convert --from
dcp`, `reshard`, `convert --to dcp` carry it through elastickit's format; a new torchtitan run
loads the result through its own `initial_load_path` (every state, strict keys) and its steps 5-8
equal the uninterrupted run's bit for bit. Before DCP conversions kept every entry, this load
failed with "Missing key in checkpoint state_dict: dataloader.dp_rank_0".

With `ElastickitCheckpointManager` as torchtitan's checkpoint manager (lazy multi-tier saves), a
SIGKILL from outside mid-run, then the same command again, ends bit-exact with an uninterrupted
run; the elastickit checkpoint converted `--to dcp` resumes under torchtitan's own manager too.

./scripts/test installs the [torchtitan] extra (about 1.5 GB: triton, which torchtitan imports
without declaring it, datasets, pyarrow, pandas, tensorboard, wandb); elsewhere
`pip install 'elastickit[torchtitan]'` then `pytest tests/integrations/test_torchtitan.py`.
The same conversion on torchtitan's exact keys and value types runs in CI without torchtitan
(tests/unit/test_dcp_fidelity.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from tests.integrations import _kill

_kill.needs("torchtitan", "needs torchtitan==0.3.0 (pip install 'elastickit[torchtitan]'; ./scripts/test installs it)")

pytestmark = [pytest.mark.slow, pytest.mark.dist]
SCRIPT = os.path.join(os.path.dirname(__file__), "torchtitan_train.py")


def _torchrun(out: str, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", SCRIPT,
           "--out", out, "--steps", "8", "--interval", "4", *args]
    done = subprocess.run(cmd, env=_kill.env(), capture_output=True, text=True, timeout=500, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _cli(*args: str) -> None:
    from elastickit.cli.main import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output


@pytest.mark.timeout(900)
def test_a_torchtitan_checkpoint_through_elastickit_resumes_bit_exact(tmp_path):
    full, moved, conv = str(tmp_path / "full"), str(tmp_path / "moved"), tmp_path / "conv"
    _torchrun(full)  # torchtitan's own checkpoints at steps 4 and 8
    _cli("convert", os.path.join(full, "checkpoint", "step-4"), str(conv / "ek"), "--from", "dcp")
    _cli("reshard", str(conv / "ek"), str(conv / "re"), "--to", "dp=2")
    _cli("convert", str(conv / "re"), str(conv / "dcp"), "--to", "dcp")
    _torchrun(moved, "--load", str(conv / "dcp"))
    for r in range(2):
        a = torch.load(os.path.join(full, f"final-{r}.pt"), weights_only=False)
        b = torch.load(os.path.join(moved, f"final-{r}.pt"), weights_only=False)
        assert (a.pop("begin"), b.pop("begin")) == (0, 4)
        losses_a, losses_b = a.pop("losses"), b.pop("losses")
        assert losses_a[4:] == losses_b
        _kill.assert_same(a, b, f"rank {r}")


@pytest.fixture(scope="module")
def launcher():
    with _kill.Launcher(SCRIPT, preload=["elastickit.integrations.torchtitan"]) as la:
        yield la


def _same(full: str, other: str, resumed_at: int) -> None:
    for r in range(2):
        a = torch.load(os.path.join(full, f"final-{r}.pt"), weights_only=False)
        b = torch.load(os.path.join(other, f"final-{r}.pt"), weights_only=False)
        assert (a.pop("begin"), b.pop("begin")) == (0, resumed_at)
        losses_a, losses_b = a.pop("losses"), b.pop("losses")
        assert losses_a[resumed_at:] == losses_b
        _kill.assert_same(a, b, f"rank {r}")


@pytest.mark.timeout(900)
def test_elastickit_as_torchtitans_checkpointer_sigkill_then_rerun(launcher, tmp_path):
    full, out, titan = str(tmp_path / "full"), str(tmp_path / "cut"), str(tmp_path / "titan")
    args = ("--steps", "8", "--interval", "2", "--manager", "ek")
    launcher.run(2, "--out", full, *args, logs=full)
    committed = launcher.run_and_kill(2, out, os.path.join(out, "ek"), wait_step=4,
                                      args=("--out", out, *args, "--block-at", "5"), torchrun=True)
    assert committed[-1] == 4
    _cli("convert", os.path.join(out, "ek"), str(tmp_path / "dcp"), "--to", "dcp")
    launcher.run(2, "--out", out, *args, logs=out)  # the same command again
    _same(full, out, resumed_at=4)
    # The elastickit checkpoint, as DCP, under torchtitan's own checkpoint manager.
    launcher.run(2, "--out", titan, "--steps", "8", "--interval", "2", "--load", str(tmp_path / "dcp"), logs=titan)
    _same(full, titan, resumed_at=4)


def test_fused_qkv_rows_are_torchtitans_split_for_any_row_range():
    """A rank holding rows [lo, hi) of a fused `wqkv` (FSDP/TP shards, aligned to kv heads or
    not) saves, for each of wq/wk/wv, those of its rows that belong to it: consecutive rows of
    the logical tensor that torchtitan's own save hook makes (GQA, weight and bias)."""
    from torchtitan.models.common.attention import FusedQKVLinear
    from torchtitan.models.common.linear import Linear

    from elastickit.integrations.torchtitan import qkv_rows

    hd, n_heads, n_kv, dim = 4, 8, 2, 5
    m = FusedQKVLinear.Config(head_dim=hd, n_heads=n_heads, n_kv_heads=n_kv,
                              wqkv=Linear.Config(in_features=dim, out_features=n_kv * 6 * hd, bias=True)).build()
    with torch.no_grad():
        m.wqkv.weight.copy_(torch.randn(m.wqkv.weight.shape))
        m.wqkv.bias.copy_(torch.randn(m.wqkv.bias.shape))
    ref = m.state_dict()
    n = m.wqkv.weight.shape[0]
    for lo, hi in [(0, n), (0, n // 2), (n // 2, n), (3, 29), (17, 18), (30, n), (0, 0)]:
        covered = 0
        for part, (idx, first) in zip(("wq", "wk", "wv"), qkv_rows(lo, hi, hd, m.heads_per_kv), strict=True):
            for param in ("weight", "bias"):
                got = getattr(m.wqkv, param).detach()[lo:hi].index_select(0, idx)
                want = ref[f"{part}.{param}"][first : first + idx.numel()]
                assert torch.equal(got, want), (lo, hi, part, param)
            covered += idx.numel()
        assert covered == hi - lo


def test_manager_saves_what_torchtitans_state_dict_holds(tmp_path):
    """One process, the llama3 debug model: each checkpoint holds the model's tensors exactly as
    torchtitan's `model.state_dict()` gives them at that step (its fused QKV split included),
    without running that state_dict at the save; a later save sees the later values, and a
    parameter replaced by a new one (not updated in place) is seen too."""
    from elastickit.reshard.adapters.registry import open_source
    from torchtitan.models.llama3 import model_registry

    from elastickit.integrations.torchtitan import ElastickitCheckpointManager

    torch.manual_seed(0)
    model = model_registry("debugmodel").model.build()
    with torch.no_grad():
        model.init_states()
    opt = torch.optim.AdamW(model.parameters())
    config = ElastickitCheckpointManager.Config(enable=True, folder="ek", interval=1)
    ckm = config.build(dataloader=None, model_parts=[model], optimizers=opt, lr_schedulers=_NoState(),
                       states={}, sd_adapter=None, base_folder=str(tmp_path))
    want = {}
    try:
        for step in (1, 2):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))  # a stand-in for an optimizer step
            if step == 2:
                model.norm.weight = torch.nn.Parameter(torch.randn_like(model.norm.weight))
            want[step] = {k: v.clone() for k, v in model.state_dict().items()}
            assert ckm._save(step)
            ckm._wait_for_saving()
        assert not ckm.model_state.fallback
    finally:
        ckm.close()
    for step in (1, 2):
        src = open_source(str(tmp_path / "ek" / f"step-{step:08d}"))
        try:
            assert any(k.endswith("qkv_linear.wq.weight") for k in want[step])
            for k, v in want[step].items():
                assert torch.equal(src.read(k), v), (step, k)
        finally:
            src.close()


class _NoState:
    def state_dict(self):
        return {}

    def load_state_dict(self, d):
        assert d == {}
