"""Benchmark: how long the training loop is blocked per checkpoint, elastickit's integrations
against the framework's own checkpointing (same model, same run settings).

For each framework (Hugging Face Trainer, Lightning, Accelerate) and each workload, two runs in
fresh processes: the framework's own checkpoints (`save_strategy="steps"`,
`ModelCheckpoint(every_n_train_steps)`, `accelerator.save_state(dir)` every N steps) and
elastickit's (`ElastickitCallback`, the Lightning callback, `install(accelerator)` then
`save_state()`), checkpointing every N steps.

Workloads (same parameter count, 12 bytes of model + AdamW state per parameter):
- `lm`: a GPT-2 language model (4 layers, width 512, vocabulary 8192, 16.8M parameters), 2
  sequences of 64 tokens per step: forward and backward take most of a step, as in real
  training.
- `mlp`: a 13.1M-parameter MLP on 8 samples per step: the optimizer step takes most of a step
  and forward + backward only ~10%, so a lazy copy has little to overlap (a stress case).

Blocking per checkpoint, measured on the training thread where it happens:
- the framework's own: the save call (its saves are synchronous; they write to the page cache
  without fsync);
- elastickit: the save call plus the wait in the fence before the next optimizer step (the only
  place the loop can wait for the background copy; the tiers write and fsync in the background).
Only checkpoints followed by an optimizer step count (the fence belongs to that step).

    .venv/bin/python benchmarks/bench_integrations.py [--steps 61] [--every 3] [--workloads lm,mlp]
    python benchmarks/bench_integrations.py --frameworks torchtitan --workloads titan --name integrations-torchtitan
    EK_BENCH_TITAN_ASYNC=disabled python benchmarks/bench_integrations.py ... --name integrations-torchtitan-sync

writes benchmarks/results/NAME.md and .json, with the machine's load average. The torchtitan run
needs the [torchtitan] extra (torchtitan 0.3.0 and the triton it imports); its own checkpoints are
DCP `async_save` (torchtitan's fastest mode), whose blocking is the save call plus its wait for
the previous save's staging before the next step.
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
    """Save calls, fence waits and optimizer-step times of one run."""

    def __init__(self) -> None:
        self.saves: list[float] = []
        self.fences: list[float] = []
        self.followed: list[bool] = []  # an optimizer step came after save i
        self.steps: list[float] = []  # wall time between consecutive optimizer steps
        self._last = 0.0
        self._in_save = False

    def hook(self, optimizer) -> None:
        optimizer.register_step_post_hook(self._post)

    def _post(self, *_a, **_k) -> None:
        now = time.perf_counter()
        if self._last:
            self.steps.append(now - self._last)
        self._last = now
        if self.followed and not self.followed[-1]:
            self.followed[-1] = True

    def wrap_save(self, fn, keep=lambda _result: True):
        """Time `fn`; count the calls for which `keep(result)` (torchtitan's save(step) is called
        every step and returns whether it saved)."""
        def timed(*a, **k):
            t0 = time.perf_counter()
            self._in_save = True
            result = None
            try:
                result = fn(*a, **k)
                return result
            finally:
                self._in_save = False
                if keep(result):
                    self.saves.append(time.perf_counter() - t0)
                    self.fences.append(0.0)
                    self.followed.append(False)
        return timed

    def wrap_fence(self, fn):
        def timed(*a, **k):
            if self._in_save or not self.fences:
                return fn(*a, **k)  # the save's own wait for the previous copy: in its time
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.fences[-1] += time.perf_counter() - t0
        return timed

    def result(self) -> dict:
        idx = [i for i, f in enumerate(self.followed) if f]
        return {"saves_s": [self.saves[i] for i in idx], "fence_s": [self.fences[i] for i in idx],
                "blocking_s": [self.saves[i] + self.fences[i] for i in idx],
                "step_median_s": statistics.median(self.steps) if self.steps else 0.0}


# -- the workloads ----------------------------------------------------------------------------

def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8192, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class _MLP:
    """A 13.1M-parameter MLP whose forward takes (x, labels) and returns {"loss": ...} (the
    Trainer's convention); built lazily so that torch is imported in the run's process only."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                layers = [nn.Linear(256, 2048), nn.GELU()]
                for _ in range(3):
                    layers += [nn.Linear(2048, 2048), nn.GELU()]
                self.net = nn.Sequential(*layers, nn.Linear(2048, 16))

            def forward(self, x, labels):
                return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}

        return MLP()


def _model(workload: str):
    return _gpt2() if workload == "lm" else _MLP.build()


def _samples(workload: str, n: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    if workload == "lm":
        ids = torch.randint(0, 8192, (n, 64), generator=g)
        return [{"input_ids": r, "labels": r} for r in ids]
    x, y = torch.randn(n, 256, generator=g), torch.randint(0, 16, (n,), generator=g)
    return [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]


def _batch(workload: str) -> int:
    return 2 if workload == "lm" else 8


def _loss(model, batch):
    return model(**batch)["loss"]


def _loader(workload: str, steps: int):
    import torch

    return torch.utils.data.DataLoader(_samples(workload, steps * _batch(workload)), batch_size=_batch(workload))


# -- the frameworks ---------------------------------------------------------------------------

def _hf(workload: str, mode: str, out: str, steps: int, every: int) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    timing = _Timing()

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            from elastickit.integrations._common import base_optimizer

            timing.hook(base_optimizer(optimizer))
            if mode == "ek":
                ck = cb.checkpointer
                ck.save = timing.wrap_save(ck.save)
                ck.fence = timing.wrap_fence(ck.fence)
            else:
                trainer._save_checkpoint = timing.wrap_save(trainer._save_checkpoint)

    set_seed(0)
    model = _model(workload)
    args = TrainingArguments(output_dir=os.path.join(out, "hf"), max_steps=steps,
                             per_device_train_batch_size=_batch(workload),
                             save_strategy="steps" if mode == "own" else "no", save_steps=every, logging_steps=10**6,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    callbacks = []
    cb = None
    if mode == "ek":
        from elastickit.integrations.hf import ElastickitCallback

        cb = ElastickitCallback(os.path.join(out, "ck"), every=every)
        callbacks.append(cb)
    callbacks.append(Probe())
    trainer = Trainer(model=model, args=args, train_dataset=_samples(workload, steps * _batch(workload)),
                      callbacks=callbacks)
    trainer.train()
    return {**timing.result(), "params": sum(p.numel() for p in model.parameters())}


def _lightning(workload: str, mode: str, out: str, steps: int, every: int) -> dict:
    import lightning.pytorch as pl
    import torch

    timing = _Timing()

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.inner = _model(workload)

        def training_step(self, batch, batch_idx):
            return _loss(self.inner, batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            timing.hook(trainer.optimizers[0])
            if mode == "ek":
                ck = cb.checkpointer
                ck.save = timing.wrap_save(ck.save)
                ck.fence = timing.wrap_fence(ck.fence)
            else:
                trainer.save_checkpoint = timing.wrap_save(trainer.save_checkpoint)

    pl.seed_everything(0, verbose=False)
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
    trainer.fit(model, _loader(workload, steps))
    return {**timing.result(), "params": sum(p.numel() for p in model.parameters())}


def _accelerate(workload: str, mode: str, out: str, steps: int, every: int) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    timing = _Timing()
    acc = Accelerator(cpu=True)
    set_seed(0)
    model = _model(workload)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt, loader = acc.prepare(model, opt, _loader(workload, steps))
    if mode == "ek":
        from elastickit.integrations.accelerate import install

        state = install(acc, os.path.join(out, "ck"))
        state.checkpointer.fence = timing.wrap_fence(state.checkpointer.fence)
    timing.hook(opt.optimizer)
    save = timing.wrap_save(acc.save_state)
    for step, batch in enumerate(loader, start=1):
        acc.backward(_loss(model, batch))
        opt.step()
        opt.zero_grad()
        if step % every == 0:
            save(os.path.join(out, "acc", f"step_{step}"))
        if step >= steps:
            break
    if mode == "ek":
        state.close()
    return {**timing.result(), "params": sum(p.numel() for p in model.parameters())}


def _torchtitan(workload: str, mode: str, out: str, steps: int, every: int) -> dict:
    """torchtitan 0.3.0's own components (llama3 debug model under FSDP2 on one rank, its
    optimizer, scheduler and dataloader), in the loop its trainer runs, with its DCP
    CheckpointManager (`async_mode` from EK_BENCH_TITAN_ASYNC: "async", DCP async_save, its
    fastest, by default; "disabled", its default, saves synchronously) or elastickit's."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpointer import CheckpointManager
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import default_adamw
    from torchtitan.models.llama3 import model_registry

    sys.path.insert(0, os.path.join(ROOT, "tests", "integrations"))
    import torchtitan_train as tt  # the CPU shims (dense attention), its dataset and train state

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'pg')}", rank=0, world_size=1)
    timing = _Timing()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = model_registry("debugmodel").model.build()
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states()
    optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=steps)
    vocab = model.tok_embeddings.weight.shape[0]
    loader = ParallelAwareDataloader(tt.Tokens(0, vocab), dp_rank=0, dp_world_size=1, batch_size=2)
    if mode == "ek":
        from elastickit.integrations.torchtitan import ElastickitCheckpointManager

        config = ElastickitCheckpointManager.Config(enable=True, folder="ek", interval=every)
    else:
        config = CheckpointManager.Config(enable=True, folder="ckpt", interval=every, last_save_model_only=False,
                                          async_mode=os.environ.get("EK_BENCH_TITAN_ASYNC", "async"))
    ckm = config.build(dataloader=loader, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
                       states={"train_state": tt.TrainState()}, sd_adapter=None, base_folder=out)
    # torchtitan waits for the previous save's staging before each optimizer step (elastickit's
    # fence is the same wait).
    ckm.maybe_wait_for_staging = timing.wrap_fence(ckm.maybe_wait_for_staging)
    timing.hook(optimizers)
    save = timing.wrap_save(ckm.save, keep=bool)
    batches = iter(loader)
    for step in range(1, steps + 1):  # torchtitan's Trainer.train_step, in short
        x, y = next(batches)
        pos = torch.arange(x.shape[1]).repeat(x.shape[0], 1)
        loss = F.cross_entropy(model(x, pos, model.get_attention_masks(pos)).flatten(0, 1).float(), y.flatten())
        loss.backward()
        ckm.maybe_wait_for_staging()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        save(step, last_step=step == steps)
    ckm.close()
    dist.destroy_process_group()
    return {**timing.result(), "params": sum(p.numel() for p in model.parameters())}


RUNS = {"hf": ("Hugging Face Trainer", _hf, "`save_strategy=\"steps\"`"),
        "lightning": ("Lightning", _lightning, "`ModelCheckpoint(every_n_train_steps)`"),
        "accelerate": ("Accelerate", _accelerate, "`accelerator.save_state(dir)`"),
        "torchtitan": ("torchtitan 0.3.0", _torchtitan, "`CheckpointManager` (DCP)")}
WORKLOADS = {"lm": "GPT-2 LM, 2x64 tokens/step", "mlp": "MLP, 8 samples/step",
             "titan": "llama3 debug model, FSDP2, 2x32 tokens/step"}


def _one(framework: str, workload: str, mode: str, out: str, steps: int, every: int) -> None:
    import torch

    torch.set_num_threads(1)
    result = RUNS[framework][1](workload, mode, out, steps, every)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=61)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--frameworks", default="hf,lightning,accelerate")
    p.add_argument("--workloads", default="lm,mlp")
    p.add_argument("--one", nargs=4, metavar=("FRAMEWORK", "WORKLOAD", "MODE", "OUT"))
    p.add_argument("--name", default="integrations", help="results file name (results/NAME.md, .json)")
    a = p.parse_args()
    if a.one:
        _one(*a.one, a.steps, a.every)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("DS_ACCELERATOR", "cpu")
    results: dict = {}
    load_before = _load()
    work = tempfile.mkdtemp(prefix="ek-bench-int-")
    try:
        for fw in a.frameworks.split(","):
            for wl in a.workloads.split(","):
                for mode in ("own", "ek"):
                    out = os.path.join(work, fw, wl, mode)
                    os.makedirs(out)
                    cmd = [sys.executable, __file__, "--steps", str(a.steps), "--every", str(a.every),
                           "--one", fw, wl, mode, out]
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise SystemExit(f"{fw} {wl} {mode} failed:\n{done.stderr[-4000:]}")
                    with open(os.path.join(out, "result.json")) as f:
                        r = results.setdefault(fw, {}).setdefault(wl, {})[mode] = json.load(f)
                    print(fw, wl, mode, "blocking", [round(x, 4) for x in r["blocking_s"]],
                          "step", round(r["step_median_s"], 3), "load", _load(), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = _load()
    rows = []
    for fw, by_wl in results.items():
        for wl, r in by_wl.items():
            own, ek = r["own"]["blocking_s"], r["ek"]["blocking_s"]
            r["ratio_median"] = statistics.median(ek) / statistics.median(own)
            r["ratio_mean"] = statistics.mean(ek) / statistics.mean(own)
            fence = statistics.median(r["ek"]["fence_s"])
            rows.append(
                f"| {RUNS[fw][0]} | {WORKLOADS[wl]} ({r['ek']['params'] / 1e6:.1f}M) | "
                f"{r['ek']['step_median_s'] * 1000:.0f} ms | {RUNS[fw][2]}: {statistics.median(own) * 1000:.0f} ms | "
                f"{statistics.median(ek) * 1000:.1f} ms (fence {fence * 1000:.1f} ms) | "
                f"**{r['ratio_median']:.3f}x** | {r['ratio_mean']:.3f}x |")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "steps": a.steps, "every": a.every,
            "torch_threads": 1, "loadavg_before": load_before, "loadavg_after": load_after,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(os.path.join(HERE, "results", f"{a.name}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    saves = len(next(iter(next(iter(results.values())).values()))["ek"]["blocking_s"])
    md = [
        "# Blocking time per checkpoint: elastickit's integrations vs the frameworks' own checkpoints",
        "",
        f"One process each, {a.steps} steps, a checkpoint every {a.every} steps ({saves} checkpoints followed"
        f" by a step); {meta['machine']}, 1 torch thread; load average (1, 5, 15 min) {load_before} before,"
        f" {load_after} after ({meta['date']}). `benchmarks/bench_integrations.py`.",
        "",
        "| framework | workload (params) | step (median) | its own checkpoint, blocking (median) |"
        " elastickit, blocking (median) | ratio (medians) | ratio (means) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Blocking, measured on the training thread: the framework's own = its save call (synchronous;"
        " written to the page cache, no fsync); elastickit = the save call + the wait in the fence before"
        " the next optimizer step (the tiers write and fsync in the background). Model + AdamW state: 12 bytes"
        " per parameter. `lm`: forward and backward take most of a step (the copy overlaps them); `mlp`: the"
        " optimizer step takes most of a step, so the copy has little to overlap and the fence waits for"
        " the rest of it.",
    ]
    if "torchtitan" in results:
        md += [
            "",
            "torchtitan rows: its own manager with `async_mode=\"async\"` (DCP `async_save`, the default"
            " here) or `\"disabled\"` (its own default, EK_BENCH_TITAN_ASYNC=disabled, the `-sync` file);"
            " its blocking = the `save` call + `maybe_wait_for_staging` before the next optimizer step"
            " (shown as elastickit's \"fence\"). torchtitan's save runs its `ModelWrapper.state_dict()` on"
            " the training thread (the fused-QKV hook gathers `wqkv` and splits it through DTensor ops,"
            " ~7 ms here); elastickit's takes the parameters as they are and splits `wqkv` with one row"
            " copy per part (the dataloader state is still gathered at the save).",
        ]
    with open(os.path.join(HERE, "results", f"{a.name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
