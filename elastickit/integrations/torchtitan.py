"""torchtitan on elastickit: a checkpoint manager with lazy multi-tier saves (torchtitan 0.3.0).

torchtitan builds its checkpoint manager from `config.checkpoint`; give it this one:

    from elastickit.integrations.torchtitan import ElastickitCheckpointManager
    config.checkpoint = ElastickitCheckpointManager.Config(enable=True, interval=50)

Everything else stays as it is: the trainer calls `save(step)` after each step and `load()` at
start; a re-run after a failure resumes from elastickit's newest checkpoint on any tier.

What a checkpoint holds: what torchtitan's own DCP checkpoint holds, under the same names: the
model's state dict at the top level (`tok_embeddings.weight`, ...; DTensor shards, resharded on
load when the layout changes), `optimizer` (torchtitan's flat FQN-keyed dict), `lr_scheduler`,
`dataloader` (every dp rank's `dp_rank_N` bytes, gathered at the save: elastickit keeps one copy
of non-tensor state), `train_state` and any other `states`. So `elastickit convert ROOT DST --to
dcp` gives a checkpoint torchtitan's own manager loads.

How a save works: `save` records references and returns; the tensors are copied in the background
while the next step's forward and backward run, and a fence before the next optimizer step (a
global optimizer step pre-hook, so it runs before torchtitan's own step hooks such as MoE load
balancing) waits only if the copy is not done; then the checkpoint flows down the tiers. The only
collective on the training thread is the gather of the dataloader states (a few KB).

Not supported: `last_save_model_only`, `last_save_in_hf` and `export_dtype` (the last checkpoint
holds the whole state, like every other), async modes (elastickit's saves are always lazy), and
HF `initial_load_in_hf`. `initial_load_path` reads a torchtitan DCP checkpoint when elastickit's
root holds none.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchtitan.components.checkpointer.base import (
    DATALOADER,
    LR_SCHEDULER,
    OPTIMIZER,
    BaseCheckpointManager,
    ModelWrapper,
)

from elastickit.checkpoint.errors import RequestError

__all__ = ["ElastickitCheckpointManager"]

log = logging.getLogger("elastickit")


class _Stateful:
    """Hands an object to the Checkpointer as a plain Stateful (torchtitan's optimizer container is
    a torch Optimizer, but its state dict is its own flat FQN-keyed one)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict()

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.obj.load_state_dict(d)


class _Dataloader(_Stateful):
    """torchtitan's dataloader state is per dp rank (`dp_rank_N`): every rank's, gathered, so that
    the one copy elastickit keeps of non-tensor state holds them all (as torchtitan's DCP does)."""

    def state_dict(self) -> dict[str, Any]:
        mine = self.obj.state_dict()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return mine
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        merged: dict[str, Any] = {}
        for d in every:
            merged.update(d)
        return merged


class ElastickitCheckpointManager(BaseCheckpointManager):
    """torchtitan's `BaseCheckpointManager` on `elastickit.Checkpointer` (see the module doc)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        """torchtitan's checkpoint options (interval, folder, keep_latest_k, load_step,
        exclude_from_loading, initial_load_path, ...) plus elastickit's tiers."""

        local_path: str | None = None
        """A node-local tier (e.g. /dev/shm/ek/{node}) besides the persistent `folder`."""

        last_save_model_only: bool = False
        """Must stay False: the last checkpoint holds the whole state, as every other."""

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any,
        model_parts: list[torch.nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any = None,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        self.save_future = None
        if not self.enable:
            return
        from elastickit.api import Checkpointer
        from elastickit.checkpoint.tiers import Tiers, TierSpec

        if config.last_save_model_only or config.last_save_in_hf or config.initial_load_in_hf:
            raise RequestError(
                "ElastickitCheckpointManager saves the whole state at every checkpoint and reads no HF "
                "weights: set checkpoint.last_save_model_only, last_save_in_hf and initial_load_in_hf to False"
            )
        self.config = config
        self.folder = os.path.join(base_folder, config.folder)
        self.model = ModelWrapper(model_parts)
        self.optimizers = optimizers
        self.others: dict[str, Any] = {
            **{k: _Stateful(v) for k, v in states.items()},
            OPTIMIZER: _Stateful(optimizers),
            LR_SCHEDULER: _Stateful(lr_schedulers),
        }
        if dataloader is not None:
            self.others[DATALOADER] = _Dataloader(dataloader)
        tiers = Tiers(local=TierSpec(path=config.local_path)) if config.local_path else None
        self.checkpointer = Checkpointer(
            self.folder, every=config.interval, tiers=tiers, lazy="always",
            keep_last=config.keep_latest_k or None,
        )
        # lazy="always": every saved tensor is copied in the background, and torchtitan changes
        # them only in an optimizer step. A global pre-hook runs before any optimizer's own
        # hooks (torchtitan's MoE load balancing updates its expert bias in one).
        self._hook = register_optimizer_step_pre_hook(
            lambda *_a, **_k: self.checkpointer.fence()
        )

    def _state(self, *, loading: bool) -> dict[str, Any]:
        """The model's tensors at the top level and the other states by name (when loading,
        without those in `exclude_from_loading`)."""
        state: dict[str, Any] = dict(self.model.state_dict())
        clash = sorted(set(state) & set(self.others))
        if clash:
            raise RequestError(f"model state {clash[0]!r} has the name of a torchtitan state; rename it")
        skip = set(self.config.exclude_from_loading) if loading else set()
        state.update({k: v for k, v in self.others.items() if k not in skip})
        return state

    # -- BaseCheckpointManager's hooks ----------------------------------------------------------

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        first = curr_step == 1 and self.config.enable_first_step_checkpoint
        if not (last_step or first or self.checkpointer.due(curr_step)):
            return False
        return self.checkpointer.save(curr_step, self._state(loading=False), force=True).scheduled

    def _load(self, step: int = -1) -> bool:
        # restore fills the model's state-dict tensors in place (resharding when the layout
        # changed) and loads the other states through their load_state_dict. Some of the model's
        # tensors are made by state-dict hooks (torchtitan's fused QKV hands out wq/wk/wv), so
        # they go back through the model's own load_state_dict, as torchtitan's DCP load does.
        state = self._state(loading=True)
        if self.checkpointer.restore(state, step=None if step == -1 else step):
            self.model.load_state_dict({k: v for k, v in state.items() if k not in self.others})
            return True
        if self.config.initial_load_path:
            return self._load_dcp(self.config.initial_load_path, model_only=self.config.initial_load_model_only)
        return False

    def _load_dcp(self, path: str, *, model_only: bool) -> bool:
        """torchtitan's own initial load: a DCP checkpoint into the live states."""
        import torch.distributed.checkpoint as dcp

        if not os.path.isdir(path):
            raise RequestError(f"checkpoint.initial_load_path {path} is not a directory")
        states: dict[str, Any] = dict(self.model.state_dict())
        if not model_only:
            for k, v in self.others.items():
                if k not in self.config.exclude_from_loading:
                    states[k] = v.obj
        dcp.load(states, checkpoint_id=path)
        self.model.load_state_dict({k: v for k, v in states.items() if k not in self.others})
        return True

    def _maybe_wait_for_staging(self) -> None:
        self.checkpointer.fence()

    def _wait_for_saving(self) -> None:
        self.checkpointer.wait()

    def _close(self) -> None:
        self._hook.remove()
        self.checkpointer.close()
