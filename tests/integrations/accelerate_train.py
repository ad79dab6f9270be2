"""A tiny Accelerate loop written as Accelerate's examples write it (resume with `load_state`,
skip the batches already trained with `skip_first_batches`, `save_state` every step), with
elastickit behind save_state/load_state (`--mode ek`) or Accelerate's own (`--mode acc`).

    python accelerate_train.py --out OUT --root ROOT [--block-at K] [--mode ek|acc]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn


class Progress:
    """The loop's position, registered for checkpointing (Accelerate's usual pattern)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0

    def state_dict(self):
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, d):
        self.epoch, self.batch = int(d["epoch"]), int(d["batch"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--mode", default="ek", choices=["ek", "acc"])
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
    # A seeded sampler and a loader generator: the data order and the global RNG stay the same
    # whether the loop starts fresh or resumes (as Accelerate's own save_state needs too).
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(7)
    layers: list[nn.Module] = [nn.Linear(16, a.width), nn.GELU(), nn.Dropout(0.2)]
    for _ in range(a.depth - 1):
        layers += [nn.Linear(a.width, a.width), nn.GELU(), nn.Dropout(0.2)]
    model = nn.Sequential(*layers, nn.Linear(a.width, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(48, 16, generator=g), torch.randint(0, 4, (48,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(99))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    state = None
    if a.mode == "ek":
        from elastickit.integrations.accelerate import install

        state = install(accelerator, a.root, every=a.every)
        accelerator.load_state()
    else:
        dirs = sorted(os.listdir(a.root), key=lambda d: int(d.split("_")[1])) if os.path.isdir(a.root) else []
        if dirs:
            accelerator.load_state(os.path.join(a.root, dirs[-1]))
    unwrapped = accelerator.unwrap_model(model)
    sd = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    steps = progress.batch // 2 + progress.epoch * (len(loader) // 2)
    torch.save({"model": sd, "step": steps}, os.path.join(a.out, f"begin-{rank}.pt"))
    seen, save_s = [], []
    while steps < a.steps:
        loader.set_epoch(progress.epoch)
        active = accelerator.skip_first_batches(loader, progress.batch) if progress.batch else loader
        for xb, yb in active:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            progress.batch += 1
            seen.append((steps, round(float(xb.sum()), 4), round(float(torch.rand(1)), 6)))
            if accelerator.sync_gradients:
                steps += 1
                if steps == a.dump_at:
                    sd = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
                    torch.save({"model": sd}, os.path.join(a.out, f"step{steps}-{rank}.pt"))
                if steps % a.every == 0 or steps == a.steps:
                    t0 = time.perf_counter()
                    accelerator.save_state(os.path.join(a.root, f"step_{steps}") if a.mode == "acc" else None)
                    save_s.append(time.perf_counter() - t0)
                if steps == a.block_at:
                    open(os.path.join(a.out, f"blocked-{rank}"), "w").close()
                    threading.Event().wait()
                if steps >= a.steps:
                    break
        if steps >= a.steps:
            break
        progress.epoch += 1
        progress.batch = 0
    if state is not None:
        state.close()
    final = {
        "model": {k: v.detach().clone() for k, v in unwrapped.state_dict().items()},
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "steps": steps,
        "seen": seen,
    }
    torch.save(final, os.path.join(a.out, f"final-{rank}.pt"))
    torch.save(save_s, os.path.join(a.out, f"saves-{rank}.pt"))


if __name__ == "__main__":
    main()
