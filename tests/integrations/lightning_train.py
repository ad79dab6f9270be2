"""A tiny Lightning run (MLP with dropout, AdamW, a step-wise LambdaLR, gradient accumulation,
a resumable dataloader as Lightning needs for an exact mid-epoch resume) with elastickit's
callback or Lightning's own ModelCheckpoint.

    python lightning_train.py --out OUT --root ROOT [--block-at K] [--mode ek|pl] [--strategy ddp|fsdp2]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import lightning.pytorch as pl
import torch
from torch import nn


def plain(x):
    """`x` with every DTensor (FSDP2) replaced by the whole tensor (a collective: every rank calls it)."""
    if hasattr(x, "full_tensor"):
        return x.full_tensor().detach().clone()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(plain(v) for v in x)
    return x


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader with state_dict/load_state_dict, which Lightning saves in its loop state (as
    torchdata's StatefulDataLoader does): the shuffling generator's state at the start of the
    epoch and the number of batches handed out since."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0
        self._epoch_gen: torch.Tensor | None = None

    def __iter__(self):
        if self.generator is not None:
            if self._skip:
                self.generator.set_state(self._epoch_gen)
            self._epoch_gen = self.generator.get_state()
        skip, self._skip = self._skip, 0
        self._yielded = 0
        for i, batch in enumerate(super().__iter__()):
            self._yielded = i + 1
            if i >= skip:
                yield batch

    def state_dict(self):
        d = {"yielded": self._yielded}
        if self._epoch_gen is not None:
            d["generator"] = self._epoch_gen
        return d

    def load_state_dict(self, d):
        self._skip = int(d["yielded"])
        self._epoch_gen = d.get("generator")


class Net(pl.LightningModule):
    def __init__(self, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(16, width), nn.GELU(), nn.Dropout(0.2)]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.GELU(), nn.Dropout(0.2)]
        layers.append(nn.Linear(width, 4))
        self.net = nn.Sequential(*layers)
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.global_step, round(float(x.sum()), 4), round(float(torch.rand(1)), 6)))
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_model(self):
        # FSDP2 under ModelParallelStrategy (--strategy fsdp2): each Linear and the whole net
        # sharded over the data-parallel mesh, as Lightning's FSDP2 examples do.
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(self.net, mesh=mesh["data_parallel"])
        self._sharded = True

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Probe(pl.Callback):
    def __init__(self, out: str, block_at: int, dump_at: int) -> None:
        self.out, self.block_at, self.dump_at = out, block_at, dump_at

    def on_train_start(self, trainer, pl_module):
        sd = plain(pl_module.state_dict())
        torch.save({"model": sd, "global_step": trainer.global_step},
                   os.path.join(self.out, f"begin-{trainer.global_rank}.pt"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.dump_at:
            sd = plain(pl_module.state_dict())
            torch.save({"model": sd}, os.path.join(self.out, f"step{self.dump_at}-{trainer.global_rank}.pt"))
        if trainer.global_step == self.block_at:
            open(os.path.join(self.out, f"blocked-{trainer.global_rank}"), "w").close()
            threading.Event().wait()


class Timer(pl.Callback):
    """Per optimizer step: wall time of the whole training batch (for the benchmark)."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.batches: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((trainer.global_step, time.perf_counter() - self.t0))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--mode", default="ek", choices=["ek", "pl"])
    p.add_argument("--strategy", default="auto")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--block-at", type=int, default=-1)
    p.add_argument("--dump-at", type=int, default=-1)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    a = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    torch.set_num_threads(1)
    pl.seed_everything(7, workers=True, verbose=False)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(48, 16, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    loader = ResumableLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True,
                             generator=torch.Generator().manual_seed(99))
    model = Net(a.width, a.depth)
    callbacks: list = [Probe(a.out, a.block_at, a.dump_at)]
    if a.mode == "ek":
        from elastickit.integrations.lightning import ElastickitCallback

        callbacks.insert(0, ElastickitCallback(a.root, every=a.every))
        ckpt_path = None
    else:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.insert(0, ModelCheckpoint(dirpath=a.root, every_n_train_steps=a.every, save_last=True,
                                            save_top_k=-1))
        ckpt_path = "last"
    timer = Timer()
    callbacks.append(timer)
    strategy = a.strategy
    if strategy == "fsdp2":  # FSDP2: Lightning's strategy="fsdp" (FSDP1) refuses a CPU accelerator
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=int(os.environ.get("WORLD_SIZE", "1")),
                                         tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", "1")), strategy=strategy,
        max_steps=a.steps, accumulate_grad_batches=2, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=a.out,
        deterministic=True, num_sanity_val_steps=0, enable_checkpointing=a.mode == "pl",
    )
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    opt = trainer.optimizers[0]
    final = {
        "model": plain(model.state_dict()),
        "optim": plain(opt.state_dict()),
        "sched": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "seen": model.seen,
    }
    torch.save(final, os.path.join(a.out, f"final-{trainer.global_rank}.pt"))
    torch.save(timer.batches, os.path.join(a.out, f"times-{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
