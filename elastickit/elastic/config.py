"""What an elastic run is (`ElasticConfig`), where a worker is (`WorkerEnv`), and the layout
checks made before a launch."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from .policy import LayoutRequest, ModelLimits, choose_layout, parse_pins

__all__ = ["ElasticConfig", "WorkerEnv", "first_layout", "model_limits"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ElasticConfig:
    """What one elastic training run is (every worker gets the same)."""

    run: str
    """The run directory (steps.jsonl, events.jsonl, checkpoints in RUN/ckpt)."""
    ckpt: str | None = None
    """Checkpoint root (default RUN/ckpt)."""
    local_tier: str = ""
    """This node's node-local tier directory (default RUN/local/node<node>)."""
    model: str = "tiny"
    steps: int = 100
    global_batch: int = 24
    """Samples per step, the same in every layout."""
    micro_batch: int = 2
    """Samples per microbatch; grad_accum = global_batch / (dp * micro_batch)."""
    seq_len: int = 32
    layout: str = "auto"
    """`auto`, or axes to pin (`tp=2`); the others follow the world."""
    lr: float | None = None
    seed: int = 0
    dp_mode: str = "fsdp"
    every: int = 1
    """Checkpoint every N steps (host memory; the tiers pull the newest)."""
    hang_s: float = 1.0
    """A member whose heartbeat is silent this long is taken for hung and left out."""
    rank_memory_mib: float | None = None
    """Training state one rank may hold (the policy's memory budget); None: any."""
    step_sleep_s: float = 0.0
    """Extra seconds per step (to slow a demo down to what a person can follow)."""
    inject: tuple[str, ...] = ()
    """`hang:rank=R:step=S` faults the workers inject themselves (tests, benchmarks)."""
    local_busy: float = 0.5
    """The node-local tier's share of a core (its freshness: lost work after a failure)."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "seq_len", "every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"--global-batch {self.global_batch} is not a multiple of --micro-batch {self.micro_batch}"
            )
        if self.hang_s <= 0:
            raise ValueError(f"--hang-timeout must be positive, got {self.hang_s}")
        if self.step_sleep_s < 0:
            raise ValueError(f"--step-sleep must be >= 0 seconds, got {self.step_sleep_s}")
        try:
            parse_pins(self.layout)
        except ValueError as e:
            raise ValueError(f"--layout {self.layout!r}: {e}") from None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEnv:
    """Where this worker is: set by the elastickit agent (and torchrun) in its environment."""

    store_host: str
    store_port: int
    run_id: str
    node: str
    local_rank: int
    expected: int
    """Workers of the first rendezvous (torchrun's WORLD_SIZE): the first plan waits for them."""

    @classmethod
    def from_environ(cls, env: dict[str, str] | None = None) -> WorkerEnv:
        e = dict(os.environ if env is None else env)
        try:
            host, _, port = e["ELASTICKIT_STORE"].rpartition(":")
            return cls(
                store_host=host,
                store_port=int(port),
                run_id=e["ELASTICKIT_RUN_ID"],
                node=e.get("ELASTICKIT_NODE", e.get("GROUP_RANK", "0")),
                local_rank=int(e.get("LOCAL_RANK", "0")),
                expected=int(e.get("WORLD_SIZE", "1")),
            )
        except KeyError as k:
            raise ValueError(
                f"{k.args[0]} is not set: run the elastic worker under `elastickit launch` or "
                "`elastickit train --nodes`"
            ) from None


def first_layout(cfg: ElasticConfig, nodes: Sequence[int]) -> str:
    """The layout `cfg` trains on with `nodes` ranks per node (NoLayoutError says why none):
    checked before a launch, so that a job that can never train is refused at once."""
    choice = choose_layout(
        LayoutRequest(
            nodes=tuple(nodes),
            global_batch=cfg.global_batch,
            micro_batch=cfg.micro_batch,
            limits=model_limits(cfg.model),
            pins=tuple(parse_pins(cfg.layout).items()),
            rank_budget_bytes=int(cfg.rank_memory_mib * 2**20) if cfg.rank_memory_mib else None,
        )
    )
    return f"{choice.layout.text()}, grad_accum {choice.grad_accum}" + (
        f", {len(choice.spares)} spare rank(s)" if choice.spares else ""
    )


def model_limits(model: str, state_multiplier: int = 16) -> ModelLimits:
    """What the reference model allows: tp degrees, pipeline stages, bytes of training state
    (fp32 parameter, gradient and two AdamW moments: 16 bytes a parameter)."""
    from elastickit.trainer.model import model_config

    cfg = model_config(model)
    tps = []
    for tp in range(1, 65):
        try:
            cfg.check_tp(tp)
        except ValueError:
            continue
        tps.append(tp)
    return ModelLimits(tp_degrees=tuple(tps), max_pp=cfg.n_layers, state_bytes=cfg.num_params() * state_multiplier)
