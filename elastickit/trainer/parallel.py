"""Apply a (pp, dp, tp) layout to the decoder with PyTorch's own parallelism (torchtitan-style).

Order, as in torchtitan: prune the model to this rank's pipeline stage, then tensor parallel
(`torch.distributed.tensor.parallel`, Colwise/Rowwise), then data parallel (FSDP2
`fully_shard` per layer and at the root, or DDP-style `replicate`), then wrap the stage in a
`torch.distributed.pipelining.PipelineStage` driven by a GPipe or 1F1B schedule.
The same code runs gloo on CPU and NCCL on GPU.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .model import ModelConfig, Transformer, fused_parts, fused_to_tp_order, init_weights

__all__ = [
    "TrainLayout",
    "build_mesh",
    "clip_grad_norm_",
    "parallelize",
    "stage_layers",
]

AXES = ("pp", "dp", "tp")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainLayout:
    """Degrees of the three mesh axes; the mesh is (pp, dp, tp), tp innermost."""

    pp: int = 1
    """Pipeline stages."""
    dp: int = 1
    """Data-parallel replicas (FSDP2 shards or DDP replicas)."""
    tp: int = 1
    """Tensor-parallel ranks."""

    def __post_init__(self) -> None:
        for axis in AXES:
            if not isinstance(getattr(self, axis), int) or getattr(self, axis) < 1:
                raise ValueError(
                    f"TrainLayout.{axis} must be a positive int, got {getattr(self, axis)!r}"
                )

    @property
    def world_size(self) -> int:
        """pp * dp * tp."""
        return self.pp * self.dp * self.tp

    @classmethod
    def parse(cls, text: str) -> TrainLayout:
        """Parse `dp=2,tp=2` (axes pp, dp, tp; missing axes are 1; `1` or `` is one rank)."""
        text = text.strip()
        if text in ("", "1", "single"):
            return cls()
        degrees: dict[str, int] = {}
        for item in text.split(","):
            m = re.fullmatch(r"\s*([a-z]+)\s*=\s*(\d+)\s*", item)
            if m is None:
                raise ValueError(f"layout item {item!r} in {text!r} is not AXIS=N (e.g. dp=2,tp=2)")
            axis, n = m.group(1), int(m.group(2))
            if axis not in AXES:
                raise ValueError(f"layout axis {axis!r} in {text!r} is not one of pp, dp, tp")
            if axis in degrees:
                raise ValueError(f"layout {text!r} names {axis} twice")
            if n < 1:
                raise ValueError(
                    f"{axis}={n}: an axis needs at least 1 rank (write {axis}=1 or leave it out)"
                )
            degrees[axis] = n
        return cls(**degrees)

    def __str__(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES if getattr(self, a) > 1) or "single"


def build_mesh(layout: TrainLayout, device_type: str) -> DeviceMesh:
    """The (pp, dp, tp) DeviceMesh over the default process group."""
    if dist.get_world_size() != layout.world_size:
        raise ValueError(
            f"layout {layout} needs {layout.world_size} ranks but the process group has "
            f"{dist.get_world_size()}"
        )
    return init_device_mesh(device_type, (layout.pp, layout.dp, layout.tp), mesh_dim_names=AXES)


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """Global layer indices of pipeline stage `stage` (contiguous; first n % pp get one more)."""
    if n_layers < pp:
        raise ValueError(f"{n_layers} layers cannot be split over pp={pp} stages")
    base, extra = divmod(n_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def _prune_to_stage(model: Transformer, pp: int, stage: int) -> None:
    keep = {str(i) for i in stage_layers(model.cfg.n_layers, pp, stage)}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None
    if stage < pp - 1:
        model.norm = None
        model.output = None


@torch.no_grad()
def _apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    # Fused parameters: reorder rows so that Shard(0) hands rank r [q_r; k_r; v_r].
    for suffix, parts in fused_parts(model.cfg).items():
        sizes = [n for _, n in parts]
        for fqn, p in model.named_parameters():
            if fqn.endswith(suffix):
                p.copy_(fused_to_tp_order(p.detach().clone(), sizes, tp))
    plan: dict[str, object] = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate()
        )
    if model.output is not None:
        plan["output"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, tp_mesh, plan)
    for layer in model.layers.values():
        layer_plan: dict[str, object] = {
            "attention.wqkv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
        }
        if not model.cfg.moe:  # MoE experts stay replicated over tp (no ep axis yet)
            layer_plan["feed_forward.w13"] = ColwiseParallel()
            layer_plan["feed_forward.w2"] = RowwiseParallel()
        parallelize_module(layer, tp_mesh, layer_plan)
        layer.attention.tp_degree = tp


def _apply_dp(model: Transformer, dp_mesh: DeviceMesh, mode: str, tp: int, pp: int) -> None:
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Under pp the stage runs several microbatches per step: keep parameters gathered
        # between forward and backward (torchtitan does the same).
        reshard = pp == 1
        for layer in model.layers.values():
            fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard)
    elif mode == "replicate":
        if tp > 1:
            raise ValueError("dp_mode 'replicate' is supported without tp only; use 'fsdp'")
        from torch.distributed._composable.replicate import replicate

        replicate(model, device_mesh=dp_mesh)
    else:
        raise ValueError(f"dp_mode must be 'fsdp' or 'replicate', got {mode!r}")


def parallelize(
    cfg: ModelConfig,
    layout: TrainLayout,
    mesh: DeviceMesh | None,
    *,
    seed: int,
    device: torch.device,
    dp_mode: str = "fsdp",
) -> Transformer:
    """Build this rank's part of the model, initialised identically for every layout.

    With `mesh=None` (single process, no process group) the full model is returned.
    """
    cfg.check_tp(layout.tp)
    model = Transformer(cfg, tp=layout.tp)
    init_weights(model, seed)  # full logical init, then prune/shard: same values everywhere
    if mesh is None:
        return model.to(device)
    if layout.pp > 1:
        _prune_to_stage(model, layout.pp, mesh["pp"].get_local_rank())
    model.to(device)
    if layout.tp > 1:
        _apply_tp(model, mesh["tp"])
    if layout.dp > 1:
        _apply_dp(model, mesh["dp"], dp_mode, layout.tp, layout.pp)
    return model


def _sq_norm_groups(grad: torch.Tensor) -> tuple[torch.Tensor, tuple[dist.ProcessGroup, ...]]:
    """(local sum of squares, groups to sum it over) for a plain or DTensor gradient."""
    if not isinstance(grad, DTensor):
        return grad.detach().float().pow(2).sum(), ()
    groups = []
    for mesh_dim, placement in enumerate(grad.placements):
        # FSDP2 over a tp-sharded dim uses _StridedShard (not a Shard subclass): disjoint too.
        if isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard":
            groups.append(grad.device_mesh.get_group(mesh_dim))
        elif not isinstance(placement, Replicate):
            raise ValueError(f"gradient placement {placement} is not Shard or Replicate")
    return grad.to_local().detach().float().pow(2).sum(), tuple(groups)


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None
) -> float:
    """Clip gradients to a global L2 norm over all ranks and stages; return the norm before.

    Works for any mix of plain tensors (replicated) and DTensors (Shard pieces are summed over
    their mesh dims, Replicate ones counted once), then sums the stages over `pp_group`.
    """
    params = [p for p in params if p.grad is not None]
    buckets: dict[tuple[dist.ProcessGroup, ...], torch.Tensor] = {}
    for p in params:
        sq, groups = _sq_norm_groups(p.grad)
        buckets[groups] = buckets.get(groups, torch.zeros((), device=sq.device)) + sq
    total: torch.Tensor | None = None
    # Insertion order = parameter order, the same on every rank of a stage: collectives match.
    for groups, sq in buckets.items():
        for g in groups:
            dist.all_reduce(sq, group=g)
        total = sq if total is None else total + sq
    device = params[0].grad.device if params else torch.device("cpu")
    if total is None:
        total = torch.zeros((), device=device)
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.mul_(coef)
    return norm


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_schedule(
    model: Transformer,
    mesh: DeviceMesh,
    *,
    device: torch.device,
    n_microbatches: int,
    schedule: str,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_fn,
) -> object:
    """A GPipe or 1F1B schedule over this rank's stage (one stage per pp rank)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    pp_mesh = mesh["pp"]
    stage = PipelineStage(
        model, pp_mesh.get_local_rank(), pp_mesh.size(), device, group=pp_mesh.get_group()
    )
    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule not in classes:
        raise ValueError(f"pp schedule must be 'gpipe' or '1f1b', got {schedule!r}")
    return classes[schedule](stage, n_microbatches=n_microbatches, loss_fn=loss, scale_grads=True)
