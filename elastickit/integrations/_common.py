"""Small pieces the framework integrations share (Hugging Face, Lightning, Accelerate).

Nothing here imports a framework: each integration module imports its own, so that
`elastickit.integrations.hf` works without Lightning installed and the other way round.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from elastickit.checkpoint.errors import RequestError


def base_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's `AcceleratedOptimizer`,
    Lightning's `LightningOptimizer`, ...): the object whose step pre-hook fences the copy."""
    seen = 0
    while hasattr(opt, "optimizer") and seen < 8 and type(opt).__module__.split(".")[0] != "torch":
        opt = opt.optimizer
        seen += 1
    if not isinstance(opt, torch.optim.Optimizer):
        raise RequestError(f"cannot find a torch.optim.Optimizer inside {type(opt).__name__}")
    return opt


def load_optimizer_holder(model: nn.Module, optimizer: torch.optim.Optimizer, holder: Mapping[str, Any]) -> None:
    """Load an optimizer state restored into a plain dict (FQN-keyed, as elastickit saves it,
    tensors whole) into `optimizer`, whatever the model's parallel layout is now."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    # Whole tensors into a sharded (FSDP2/DTensor) model: each rank keeps its own slice.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False) if sharded else None
    set_optimizer_state_dict(model, optimizer, dict(holder), options=options)


def rng_states() -> dict[str, Any]:
    """This process's RNG states in the layout `torch.save`d by the Hugging Face Trainer and
    Lightning (`python`, `numpy`, `cpu`, and `cuda` where there is one)."""
    import numpy as np

    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.random.get_rng_state_all()
    return out


def find_caller(predicate: Callable[[Any], bool], *, depth: int = 12) -> Any:
    """The `self` of the nearest calling frame that satisfies `predicate`, or None.

    Frameworks call their callbacks' setup hooks from inside their own constructors without
    passing themselves; this finds the object that is calling (checked by `predicate`, never
    guessed from a name).
    """
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if obj is not None and predicate(obj):
            return obj
        frame = frame.f_back
    return None
