"""A tiny Hugging Face Trainer run (GPT-2 with dropout, AdamW, linear warmup schedule, gradient
accumulation, logging every 3 steps) with `ElastickitCallback` or the Trainer's own checkpoints.

    python hf_train.py --out OUT --root ROOT [--block-at K] [--mode ek|hf] [--steps N]

Writes OUT/final-<rank>.pt (model, optimizer and scheduler state, log history) at the end and
OUT/begin-<rank>.pt (the model as training starts, after any resume).
"""

from __future__ import annotations

import argparse
import os
import threading

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Probe(TrainerCallback):
    """Writes the pid, the model at train begin, and blocks at step K (the test kills us there)."""

    def __init__(self, out: str, block_at: int, dump_at: int, rank: int) -> None:
        self.out, self.block_at, self.dump_at, self.rank = out, block_at, dump_at, rank

    def on_train_begin(self, args, state, control, model=None, **kw):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"model": sd, "global_step": state.global_step}, os.path.join(self.out, f"begin-{self.rank}.pt"))

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.dump_at:
            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            torch.save({"model": sd}, os.path.join(self.out, f"step{self.dump_at}-{self.rank}.pt"))
        if state.global_step == self.block_at:
            open(os.path.join(self.out, f"blocked-{self.rank}"), "w").close()
            threading.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--mode", default="ek", choices=["ek", "hf"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--block-at", type=int, default=-1)
    p.add_argument("--dump-at", type=int, default=-1)
    p.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    a = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=os.path.join(a.out, "hf"), max_steps=a.steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=3, lr_scheduler_type="linear",
        logging_steps=3, save_strategy="steps" if a.mode == "hf" else "no", save_steps=a.every,
        report_to=[], seed=7, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    if a.size == "tiny":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    else:
        cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=64, bos_token_id=0, eos_token_id=0)
    set_seed(7)  # the model's initial weights
    model = GPT2LMHeadModel(cfg)  # dropout 0.1 everywhere: the RNG matters
    callbacks: list = []
    if a.mode == "ek":
        from elastickit.integrations.hf import ElastickitCallback

        callbacks.append(ElastickitCallback(a.root, every=a.every))
    callbacks.append(Probe(a.out, a.block_at, a.dump_at, rank))
    ds = Tokens(24, cfg.n_positions, cfg.vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.train()
    final = {
        "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "optim": trainer.optimizer.state_dict(),
        "sched": trainer.lr_scheduler.state_dict(),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "logs": [e for e in trainer.state.log_history if "loss" in e],
    }
    torch.save(final, os.path.join(a.out, f"final-{rank}.pt"))


if __name__ == "__main__":
    main()
