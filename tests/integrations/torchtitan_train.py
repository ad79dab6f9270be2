"""torchtitan 0.3.0's own components on CPU: its llama3 debug model (FSDP2 over the ranks), its
AdamW `OptimizersContainer`, its `LRSchedulersContainer`, its `ParallelAwareDataloader` (each dp
rank's state pickled into bytes) and its DCP `CheckpointManager` with a train state, in the loop
torchtitan's Trainer runs.

    torchrun --nproc-per-node 2 torchtitan_train.py --out OUT --steps 8 --interval 4 [--load DCP_DIR]
        [--manager dcp|ek] [--block-at K]

With `--manager ek` its checkpoint manager is elastickit's (`ElastickitCheckpointManager`, root
OUT/ek). Writes OUT/checkpoint/step-N (torchtitan's own DCP checkpoints) and OUT/final-<rank>.pt (every
state, DTensors made whole). With --load it resumes from DCP_DIR through torchtitan's
`initial_load_path` (all states, not the model only), as a run moved to a converted checkpoint.

Running on CPU needs what torchtitan does not ship for it (facts from running it here): flex
attention has no backward on CPU, so attention is dense causal SDPA (the same mask for one document
per sequence); gloo has no PREMUL_SUM, so FSDP2 reduces with a sum.
"""

from __future__ import annotations

import argparse
import os
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchtitan.components.checkpointer import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer.optimizer import default_adamw
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.llama3 import model_registry

SEQ = 32


def _dense_attention(self, q, k, v, *, attention_masks, score_mod=None, scale=None, enable_gqa=False,
                     out_transform=None, **_):
    assert score_mod is None and out_transform is None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


FlexAttention.forward = _dense_attention


class Tokens(torch.utils.data.IterableDataset, Stateful):
    """Deterministic token sequences per dp rank, with a resumable position (as torchtitan's
    datasets have)."""

    def __init__(self, rank: int, vocab: int) -> None:
        self.rank, self.vocab, self.pos = rank, vocab, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 * self.rank + self.pos)
            ids = torch.randint(0, self.vocab, (SEQ + 1,), generator=g)
            self.pos += 1
            yield ids[:-1], ids[1:]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, d):
        self.pos = int(d["pos"])


class TrainState(Stateful):
    """What torchtitan's Trainer saves as `train_state` (its own `state_dict()`)."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self):
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, d):
        self.step, self.ntokens_seen = d["step"], d["ntokens_seen"]


def whole(x):
    if hasattr(x, "full_tensor"):
        return x.full_tensor().detach().clone()
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: whole(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(whole(v) for v in x)
    return x


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--load", default=None)
    p.add_argument("--manager", default="dcp", choices=["dcp", "ek"])
    p.add_argument("--block-at", type=int, default=-1)
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    torch.manual_seed(0)
    cfg = model_registry("debugmodel").model
    with torch.device("meta"):
        model = cfg.build()
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states()
    vocab = model.tok_embeddings.weight.shape[0]
    optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8, decay_type="linear",
                                              min_lr_factor=0.0).build(optimizers=optimizers,
                                                                       training_steps=a.steps)
    loader = ParallelAwareDataloader(Tokens(rank, vocab), dp_rank=rank, dp_world_size=world, batch_size=2)
    train_state = TrainState()
    if a.manager == "ek":  # elastickit's lazy tiers as torchtitan's checkpointer
        from elastickit.integrations.torchtitan import ElastickitCheckpointManager

        config = ElastickitCheckpointManager.Config(enable=True, folder="ek", interval=a.interval)
    else:
        config = CheckpointManager.Config(
            enable=True, folder="checkpoint", interval=a.interval, last_save_model_only=False,
            initial_load_path=a.load, initial_load_model_only=False,
        )
    checkpointer = config.build(dataloader=loader, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
            states={"train_state": train_state}, sd_adapter=None, base_folder=a.out)
    checkpointer.load(step=-1)
    begin = train_state.step
    losses = []
    batches = iter(loader)
    while train_state.step < a.steps:
        train_state.step += 1
        x, y = next(batches)
        pos = torch.arange(SEQ).repeat(x.shape[0], 1)
        logits = model(x, pos, model.get_attention_masks(pos))
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        train_state.ntokens_seen += y.numel()
        losses.append(loss.item())
        checkpointer.save(train_state.step, last_step=train_state.step == a.steps)
        if train_state.step == a.block_at:  # a stand-in for a long step: the test kills us here
            open(os.path.join(a.out, f"blocked-{rank}"), "w").close()
            threading.Event().wait()
    checkpointer.close()
    final = {
        "begin": begin,
        "losses": losses,
        "model": whole(model.state_dict()),
        "optimizer": whole(optimizers.state_dict()),
        "lr_scheduler": schedulers.state_dict(),
        "dataloader": loader.state_dict(),
        "train_state": train_state.state_dict(),
    }
    torch.save(final, os.path.join(a.out, f"final-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
