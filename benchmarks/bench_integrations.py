"""Benchmark: how long the training loop is blocked per checkpoint, elastickit's integration
against the framework's own checkpointing (same model, same run settings).

For each framework (Hugging Face Trainer, Lightning, Accelerate) two runs in fresh processes:
the framework's own checkpoints (`save_strategy="steps"`, `ModelCheckpoint(every_n_train_steps)`,
`accelerator.save_state(dir)` every N steps) and elastickit's (`ElastickitCallback`, the
Lightning callback, `install(accelerator)` then `save_state()`), checkpointing every N steps.

Blocking per checkpoint = the time of the save call on the training thread, plus, for the
optimizer step right after it, its excess over the median optimizer step (elastickit's fence
waits there if the background copy is not done). Both include fsync where the tool does it
(elastickit fsyncs; the frameworks write to the page cache).

    .venv/bin/python benchmarks/bench_integrations.py [--steps 13] [--every 3]

writes benchmarks/results/integrations.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class _Timing:
    """Optimizer-step times (pre/post hooks) and save-call times of one run."""

    def __init__(self) -> None:
        self.opt: list[float] = []
        self.after_save: list[bool] = []
        self.saves: list[float] = []
        self._t0 = 0.0
        self._saved = False

    def hook(self, optimizer) -> None:
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, *_a, **_k) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *_a, **_k) -> None:
        self.opt.append(time.perf_counter() - self._t0)
        self.after_save.append(self._saved)
        self._saved = False

    def wrap(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.saves.append(time.perf_counter() - t0)
                self._saved = True
        return timed

    def result(self) -> dict:
        plain = [t for t, s in zip(self.opt, self.after_save, strict=True) if not s][1:]  # first: warm-up
        base = statistics.median(plain) if plain else 0.0
        fence = [max(0.0, t - base) for t, s in zip(self.opt, self.after_save, strict=True) if s]
        blocking = [s + (fence[i] if i < len(fence) else 0.0) for i, s in enumerate(self.saves)]
        return {"saves_s": self.saves, "fence_s": fence, "opt_median_s": base, "blocking_s": blocking}


def _hf(mode: str, out: str, steps: int, every: int) -> dict:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    timing = _Timing()

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            from elastickit.integrations._common import base_optimizer

            timing.hook(base_optimizer(optimizer))
            if mode == "ek":
                ck = cb.checkpointer
                ck.save = timing.wrap(ck.save)
            else:
                trainer._save_checkpoint = timing.wrap(trainer._save_checkpoint)

    set_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8192, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (64, cfg.n_positions), generator=torch.Generator().manual_seed(1))
    ds = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=os.path.join(out, "hf"), max_steps=steps, per_device_train_batch_size=2,
                             save_strategy="steps" if mode == "own" else "no", save_steps=every, logging_steps=10**6,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    callbacks = []
    cb = None
    if mode == "ek":
        from elastickit.integrations.hf import ElastickitCallback

        cb = ElastickitCallback(os.path.join(out, "ck"), every=every)
        callbacks.append(cb)
    callbacks.append(Probe())
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks)
    trainer.train()
    n = sum(p.numel() for p in model.parameters())
    return {**timing.result(), "params": n}


def _mlp(width: int, depth: int):
    from torch import nn

    layers = [nn.Linear(256, width), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 16))


def _lightning(mode: str, out: str, steps: int, every: int) -> dict:
    import lightning.pytorch as pl
    import torch
    from torch import nn

    timing = _Timing()

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(2048, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            timing.hook(trainer.optimizers[0])
            if mode == "ek":
                cb.checkpointer.save = timing.wrap(cb.checkpointer.save)
            else:
                trainer.save_checkpoint = timing.wrap(trainer.save_checkpoint)

    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 256, generator=g), torch.randint(0, 16, (256,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callbacks: list = []
    cb = None
    if mode == "ek":
        from elastickit.integrations.lightning import ElastickitCallback

        cb = ElastickitCallback(os.path.join(out, "ck"), every=every)
        callbacks.append(cb)
    else:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(out, "pl"), every_n_train_steps=every, save_top_k=-1))
    callbacks.append(Probe())
    model = Net()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                         enable_checkpointing=mode == "own", num_sanity_val_steps=0)
    trainer.fit(model, loader)
    return {**timing.result(), "params": sum(p.numel() for p in model.parameters())}


def _accelerate(mode: str, out: str, steps: int, every: int) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch import nn

    timing = _Timing()
    acc = Accelerator(cpu=True)
    set_seed(0)
    model = _mlp(2048, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 256, generator=g), torch.randint(0, 16, (256,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model, opt, loader = acc.prepare(model, opt, loader)
    if mode == "ek":
        from elastickit.integrations.accelerate import install

        state = install(acc, os.path.join(out, "ck"))
    timing.hook(opt.optimizer)
    save = timing.wrap(acc.save_state)
    for step, (xb, yb) in enumerate(loader, start=1):
        loss = nn.functional.cross_entropy(model(xb), yb)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        if step % every == 0:
            save(os.path.join(out, "acc", f"step_{step}"))
        if step >= steps:
            break
    if mode == "ek":
        state.close()
    return {**timing.result(), "params": sum(p.numel() for p in model.parameters())}


RUNS = {"hf": ("Hugging Face Trainer", _hf, "`save_strategy=\"steps\"` (`Trainer._save_checkpoint`)"),
        "lightning": ("Lightning", _lightning, "`ModelCheckpoint(every_n_train_steps)` (`trainer.save_checkpoint`)"),
        "accelerate": ("Accelerate", _accelerate, "`accelerator.save_state(dir)`")}


def _one(framework: str, mode: str, out: str, steps: int, every: int) -> None:
    import torch

    torch.set_num_threads(1)
    result = RUNS[framework][1](mode, out, steps, every)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--frameworks", default="hf,lightning,accelerate")
    p.add_argument("--one", nargs=3, metavar=("FRAMEWORK", "MODE", "OUT"))
    a = p.parse_args()
    if a.one:
        _one(*a.one, a.steps, a.every)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: dict = {}
    work = tempfile.mkdtemp(prefix="ek-bench-int-")
    try:
        for fw in a.frameworks.split(","):
            for mode in ("own", "ek"):
                out = os.path.join(work, fw, mode)
                os.makedirs(out)
                cmd = [sys.executable, __file__, "--steps", str(a.steps), "--every", str(a.every), "--one", fw, mode, out]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{fw} {mode} failed:\n{done.stderr[-4000:]}")
                with open(os.path.join(out, "result.json")) as f:
                    results.setdefault(fw, {})[mode] = json.load(f)
                print(fw, mode, [round(x, 4) for x in results[fw][mode]["blocking_s"]], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for fw, r in results.items():
        own, ek = statistics.median(r["own"]["blocking_s"]), statistics.median(r["ek"]["blocking_s"])
        fence = statistics.median(r["ek"]["fence_s"]) if r["ek"]["fence_s"] else 0.0
        r["ratio"] = ek / own
        rows.append(f"| {RUNS[fw][0]} | {r['ek']['params'] / 1e6:.1f}M | {RUNS[fw][2]}: {own * 1000:.0f} ms | "
                    f"{ek * 1000:.1f} ms (fence {fence * 1000:.1f} ms) | **{ek / own:.3f}x** |")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": a.steps, "every": a.every,
            "torch_threads": 1}
    with open(os.path.join(HERE, "results", "integrations.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = [
        "# Blocking time per checkpoint: elastickit's integrations vs the frameworks' own checkpoints",
        "",
        f"One process each, {a.steps} steps, a checkpoint every {a.every} steps (medians over the checkpoints);"
        f" {meta['machine']}, 1 torch thread. `benchmarks/bench_integrations.py`.",
        "",
        "| framework | params | its own checkpoint, blocking | elastickit, blocking | ratio |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Blocking = the save call on the training thread + the optimizer step's excess over its median right"
        " after a save (elastickit's fence). Model + AdamW state: 12 bytes per parameter. The frameworks'"
        " saves write to the page cache (no fsync); elastickit's persistent tier fsyncs in the background.",
    ]
    with open(os.path.join(HERE, "results", "integrations.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
