"""run_training in one process: determinism, accumulation, hooks, resume, callbacks."""

from __future__ import annotations

import pytest
import torch

from elastickit.trainer import TrainConfig, run_training
from elastickit.trainer.callbacks import CheckpointCallback
from elastickit.trainer.hooks import PrintHook, StepHook

pytestmark = pytest.mark.timeout(120)


class _Record:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_step_start(self, step: int) -> None:
        self.calls.append(("start", step))

    def on_step_end(self, step: int, loss: float, step_time_s: float) -> None:
        assert step_time_s > 0
        self.calls.append(("end", step, loss))

    def close(self) -> None:
        self.calls.append(("close",))


def test_training_is_deterministic_learns_and_calls_every_hook() -> None:
    rec = _Record()
    assert isinstance(rec, StepHook) and isinstance(PrintHook(1), StepHook)
    cfg = TrainConfig(steps=20, seq_len=16)
    a = run_training(cfg, hooks=[rec])
    b = run_training(cfg)
    assert a.losses == b.losses and len(a.losses) == 20
    assert a.losses[-1] < a.losses[0] - 0.2  # it learns the stream
    assert rec.calls[0] == ("start", 1) and rec.calls[-1] == ("close",)
    assert [c[1] for c in rec.calls if c[0] == "end"] == list(range(1, 21))
    assert [c[2] for c in rec.calls if c[0] == "end"] == a.losses


def test_gradient_accumulation_matches_one_big_batch() -> None:
    one = run_training(TrainConfig(steps=3, seq_len=16, grad_accum=1)).losses
    four = run_training(TrainConfig(steps=3, seq_len=16, grad_accum=4)).losses
    torch.testing.assert_close(torch.tensor(four), torch.tensor(one), rtol=1e-5, atol=0)


def test_hooks_are_closed_when_a_hook_raises() -> None:
    class Boom(_Record):
        def on_step_end(self, step: int, loss: float, step_time_s: float) -> None:
            if step == 2:
                raise RuntimeError("injected")

    hook = Boom()
    with pytest.raises(RuntimeError, match="injected"):
        run_training(TrainConfig(steps=4, seq_len=8), hooks=[hook])
    assert hook.calls[-1] == ("close",)


def test_resume_is_bit_exact_in_one_process(tmp_path) -> None:
    base = {"steps": 4, "seq_len": 16, "ckpt_every": 2}
    full = run_training(TrainConfig(**base)).losses
    first = run_training(TrainConfig(**base, ckpt_dir=str(tmp_path), stop_after=2))
    second = run_training(TrainConfig(**base, ckpt_dir=str(tmp_path)))
    assert (first.start_step, first.end_step, second.start_step, second.end_step) == (0, 2, 2, 4)
    assert first.losses == full[:2]
    assert second.losses == full[2:]  # bit-identical, not merely close


def test_checkpoint_callback_restores_and_saves(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    extra = {"note": "x"}

    def state():
        return {"model": model, "optim": opt, "extra": extra}

    cb = CheckpointCallback(str(tmp_path), state, every=2)
    assert cb.on_train_start() == 0
    for step in (1, 2, 3):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        cb.on_step_end(step, 0.0, 0.1)
    cb.on_train_end()
    assert cb.last_saved_step == 2
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    cb2 = CheckpointCallback(str(tmp_path), state, every=2)
    assert cb2.on_train_start() == 2
    cb2.close()
    assert not torch.equal(model.weight, torch.zeros_like(model.weight))
    assert not torch.equal(model.weight, saved)  # step 2's weights, not step 3's


def test_build_job_steps_like_run_training(tmp_path) -> None:
    from elastickit.trainer import build_job

    cfg = TrainConfig(steps=3, seq_len=8, ckpt_dir=str(tmp_path))
    job = build_job(cfg)
    assert set(job.state()) == {"model", "optim", "data", "extra"}
    assert job.local_numel() == sum(p.numel() for p in job.model.parameters())
    losses = [job.train_step(s) for s in range(3)]
    assert job.loader.state_dict() == {"sample_index": 3 * cfg.global_batch}
    assert losses == run_training(TrainConfig(steps=3, seq_len=8)).losses
    ck = job.checkpointer()
    try:
        assert ck.save(3, job.state(), force=True).scheduled
    finally:
        ck.close()
    assert run_training(cfg).start_step == 3
