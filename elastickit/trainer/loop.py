"""The reference hybrid-parallel training loop, callable in-process on every rank.

    from elastickit.trainer import TrainConfig, run_training
    result = run_training(TrainConfig(model="tiny", layout="dp=2,tp=2", steps=20))
    result.losses  # global mean loss of each step run here, identical on every rank

Call it on every rank of an initialised default process group whose size is the layout's
world size (torchrun, or `tests/_dist.py`), or in a plain process for the single-rank layout.
The loop integrates with elastickit in three lines (DESIGN.md section 7a): it builds
`Checkpointer(ckpt_dir, every=ckpt_every)`, `step = ck.restore(state)` and
`ck.save(step, state)` after every step with state = {"model", "optim", "data", "extra"}.
The LR schedule is a pure function of the step, so the step number restores it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .data import TokenLoader, TokenStream
from .hooks import StepHook, call_close, call_step_end, call_step_start
from .model import ModelConfig, model_config
from .parallel import TrainLayout, build_mesh, build_schedule, clip_grad_norm_, loss_fn, parallelize

__all__ = ["TrainConfig", "TrainResult", "TrainingJob", "build_job", "run_training"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Everything that defines a training run (the layout included)."""

    model: str | ModelConfig = "tiny"
    """A config name (`tiny`, `tiny-moe`, `small`) or a ModelConfig."""
    layout: str | TrainLayout = "single"
    """`dp=2,tp=2`-style string or a TrainLayout; its world size must equal the group's."""
    steps: int = 10
    """Total steps of the run (the LR schedule's length); a restored run continues up to it."""
    stop_after: int | None = None
    """Stop once this many steps are done (an interruption; the LR schedule still spans
    `steps`). None: run to `steps`."""
    global_batch: int = 8
    """Samples per optimizer step over all dp ranks (kept when dp changes)."""
    seq_len: int = 32
    """Tokens per sample."""
    grad_accum: int = 2
    """Microbatches per step on each dp rank (the pipeline microbatches under pp)."""
    lr: float | None = None
    """Peak learning rate; None: 1e-2 for models of width <= 256 (tiny), else 1e-3."""
    warmup_steps: int = 3
    """Linear warmup steps, then cosine decay to min_lr_ratio * lr at `steps`."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip (<= 0 turns clipping off)."""
    seed: int = 0
    """Model init seed (values depend on (seed, FQN) only, never on the layout)."""
    data_seed: int = 0
    """Token stream seed."""
    dp_mode: str = "fsdp"
    """`fsdp` (FSDP2 fully_shard, ZeRO-3 style) or `replicate` (DDP style, no tp)."""
    pp_schedule: str = "gpipe"
    """`gpipe` or `1f1b`."""
    ckpt_dir: str | None = None
    """Checkpoint root for elastickit.Checkpointer; None: no checkpoints."""
    ckpt_every: int = 10
    """Checkpoint interval in steps."""
    device: str = "auto"
    """`auto` (cuda unless the group is gloo), `cpu` or `cuda`."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """JSON-able values saved with every checkpoint (under state["extra"])."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "seq_len", "grad_accum", "ckpt_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be auto, cpu or cuda, got {self.device!r}")

    def model_config(self) -> ModelConfig:
        """The ModelConfig this run trains."""
        return self.model if isinstance(self.model, ModelConfig) else model_config(self.model)

    def train_layout(self) -> TrainLayout:
        """The TrainLayout this run uses."""
        return (
            self.layout if isinstance(self.layout, TrainLayout) else TrainLayout.parse(self.layout)
        )

    def peak_lr(self) -> float:
        """`lr`, or the model's default when it is None."""
        if self.lr is not None:
            return self.lr
        return 1e-2 if self.model_config().dim <= 256 else 1e-3

    def lr_at(self, step: int) -> float:
        """LR of 0-based step `step`: linear warmup, then cosine to min_lr_ratio * lr."""
        lr = self.peak_lr()
        if step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        ratio = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
        return lr * ratio


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """What one call of run_training did."""

    start_step: int
    """Completed steps before this call (the restored step; 0 for a fresh run)."""
    end_step: int
    """Completed steps after this call."""
    losses: list[float]
    """Global mean loss of steps start_step+1 .. end_step (same on every rank)."""
    step_times_s: list[float]
    """Wall time of each of those steps on this rank, checkpoint save included."""
    layout: str
    """The layout, e.g. `dp=2,tp=2`."""
    num_params: int
    """Logical parameters of the model."""
    local_numel: int
    """Parameter elements held by this rank (its shards, padding included)."""


def _pick_device(choice: str) -> torch.device:
    if choice == "auto":
        gloo = dist.is_initialized() and dist.get_backend() == "gloo"
        choice = "cuda" if torch.cuda.is_available() and not gloo else "cpu"
    if choice == "cuda":
        import os

        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _microbatches(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, n: int
) -> torch.Tensor:
    """Forward/backward over n equal microbatches; the mean loss (grads of the mean)."""
    if inputs.shape[0] % n:
        raise ValueError(f"local batch {inputs.shape[0]} is not divisible by grad_accum={n}")
    total = torch.zeros((), device=inputs.device)
    for i, (x, y) in enumerate(zip(inputs.chunk(n), targets.chunk(n), strict=True)):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce once, at the end
            model.set_requires_gradient_sync(i == n - 1)
        loss = loss_fn(model(x), y) / n
        loss.backward()
        total += loss.detach()
    return total


@dataclasses.dataclass(slots=True, kw_only=True)
class TrainingJob:
    """This rank's built job: the parallel model, optimizer, loader and schedule of `cfg`.

    For code that drives steps itself (benchmarks timing a checkpoint between steps, tests):

        job = build_job(cfg)
        for step in range(cfg.steps):
            loss = job.train_step(step)      # global mean loss, the same on every rank
            ck.save(step + 1, job.state())
    """

    cfg: TrainConfig
    layout: TrainLayout
    mesh: DeviceMesh | None
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: TokenLoader
    schedule: Any
    pp_rank: int
    extra: dict[str, Any]

    def state(self) -> dict[str, Any]:
        """The Checkpointer state: {"model", "optim", "data", "extra"} (the same objects)."""
        return {
            "model": self.model,
            "optim": self.optimizer,
            "data": self.loader,
            "extra": self.extra,
        }

    def checkpointer(self) -> Any:
        """An `elastickit.Checkpointer` at cfg.ckpt_dir with this model's layout and rules."""
        import elastickit

        from .rules import model_rules, parallel_layout

        if self.cfg.ckpt_dir is None:
            raise ValueError("TrainConfig.ckpt_dir is None; set it to checkpoint")
        return elastickit.Checkpointer(
            self.cfg.ckpt_dir,
            every=self.cfg.ckpt_every,
            layout=parallel_layout(self.layout),
            rules=model_rules(self.cfg.model_config()),
        )

    def local_numel(self) -> int:
        """Parameter elements held by this rank."""
        return sum(_local(p).numel() for p in self.model.parameters())

    def train_step(self, step: int) -> float:
        """Run 0-based step `step` (LR, data, forward/backward, clip, AdamW); its global loss."""
        return self.train_step_and_vote(step, 0.0)[0]

    def train_step_and_vote(self, step: int, vote: float) -> tuple[float, float]:
        """`train_step`, and the sum over all ranks of `vote`, carried by the all-reduce that
        averages the loss: ranks agree on something at every step boundary without an extra
        collective (the elastic runtime agrees on when to grow this way)."""
        cfg, layout, device = self.cfg, self.layout, self.device
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        inputs, targets = (t.to(device) for t in self.loader.next_batch())
        if self.schedule is None:
            local_loss = _microbatches(self.model, inputs, targets, cfg.grad_accum)
        else:
            is_first, is_last = self.pp_rank == 0, self.pp_rank == layout.pp - 1
            mb_losses: list[torch.Tensor] = []
            if is_first:
                self.schedule.step(inputs, target=targets if is_last else None, losses=mb_losses)
            elif is_last:
                self.schedule.step(target=targets, losses=mb_losses)
            else:
                self.schedule.step()
            local_loss = (
                torch.stack([x.detach() for x in mb_losses]).mean()
                if is_last
                else torch.zeros((), device=device)
            )
        if cfg.max_grad_norm > 0:
            pp_group = self.mesh["pp"].get_group() if layout.pp > 1 else None
            clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm, pp_group)
        self.optimizer.step()
        return _global_loss(local_loss, layout, vote)


def build_job(cfg: TrainConfig) -> TrainingJob:
    """Build this rank's part of `cfg` (call on every rank of a group of the layout's size)."""
    mcfg, layout = cfg.model_config(), cfg.train_layout()
    device = _pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if dist.is_initialized():
        mesh = build_mesh(layout, device.type)
        dp_rank = mesh["dp"].get_local_rank()
        pp_rank = mesh["pp"].get_local_rank()
    elif layout.world_size == 1:
        mesh, dp_rank, pp_rank = None, 0, 0
    else:
        raise ValueError(
            f"layout {layout} needs an initialised process group of {layout.world_size} ranks"
        )
    if cfg.global_batch % (layout.dp * cfg.grad_accum):
        raise ValueError(
            f"global_batch {cfg.global_batch} must be a multiple of dp*grad_accum "
            f"({layout.dp}*{cfg.grad_accum})"
        )
    model = parallelize(mcfg, layout, mesh, seed=cfg.seed, device=device, dp_mode=cfg.dp_mode)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.peak_lr(),
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=cfg.weight_decay,
    )
    loader = TokenLoader(
        TokenStream(vocab_size=mcfg.vocab_size, seq_len=cfg.seq_len, seed=cfg.data_seed),
        global_batch=cfg.global_batch,
        dp_rank=dp_rank,
        dp_size=layout.dp,
    )
    schedule = None
    if layout.pp > 1:
        schedule = build_schedule(
            model, mesh, device=device, n_microbatches=cfg.grad_accum, schedule=cfg.pp_schedule
        )
    return TrainingJob(
        cfg=cfg,
        layout=layout,
        mesh=mesh,
        device=device,
        model=model,
        optimizer=optimizer,
        loader=loader,
        schedule=schedule,
        pp_rank=pp_rank,
        extra={"layout": str(layout), "model": str(cfg.model), **cfg.extra},
    )


def run_training(cfg: TrainConfig, hooks: Sequence[StepHook] = ()) -> TrainResult:
    """Train `cfg` on this rank; call on every rank of the group. See the module docstring."""
    job = build_job(cfg)
    state = job.state()
    ck = job.checkpointer() if cfg.ckpt_dir is not None else None
    losses: list[float] = []
    times: list[float] = []
    start = 0
    try:
        if ck is not None:
            start = ck.restore(state)
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
        for step in range(start, end):
            call_step_start(hooks, step + 1)
            t0 = time.perf_counter()
            loss = job.train_step(step)
            if ck is not None:
                ck.save(step + 1, state)
            if job.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            losses.append(loss)
            times.append(dt)
            call_step_end(hooks, step + 1, loss, dt)
        if ck is not None:
            ck.wait()
    finally:
        try:
            if ck is not None:
                ck.close()
        finally:
            call_close(hooks)
    return TrainResult(
        start_step=start,
        end_step=start + len(losses),
        losses=losses,
        step_times_s=times,
        layout=str(job.layout),
        num_params=cfg.model_config().num_params(),
        local_numel=job.local_numel(),
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _global_loss(local: torch.Tensor, layout: TrainLayout, vote: float = 0.0) -> tuple[float, float]:
    """(mean over dp of the last stage's loss (tp ranks hold equal copies), sum of `vote` over
    all ranks), the same on every rank."""
    if not dist.is_initialized():
        return float(local), vote
    t = torch.stack([local.detach().to(torch.float64).reshape(()), torch.tensor(vote, dtype=torch.float64)])
    dist.all_reduce(t)  # non-last stages contribute 0; every dp rank tp copies of its loss
    return float(t[0]) / (layout.dp * layout.tp), float(t[1])
