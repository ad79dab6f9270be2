"""torchtitan on elastickit: a checkpoint manager with lazy multi-tier saves (torchtitan 0.3.0).

torchtitan builds its checkpoint manager from `config.checkpoint`; give it this one:

    from elastickit.integrations.torchtitan import ElastickitCheckpointManager
    config.checkpoint = ElastickitCheckpointManager.Config(enable=True, interval=50)

Everything else stays as it is: the trainer calls `save(step)` after each step and `load()` at
start; a re-run after a failure resumes from elastickit's newest checkpoint on any tier.

What a checkpoint holds: what torchtitan's own DCP checkpoint holds, under the same names: the
model's state dict at the top level (`tok_embeddings.weight`, ...; DTensor shards, resharded on
load when the layout changes; a fused `wqkv` as torchtitan saves it, `wq`/`wk`/`wv`, each rank
holding its own rows of them), `optimizer` (torchtitan's flat FQN-keyed dict), `lr_scheduler`,
`dataloader` (every dp rank's `dp_rank_N` bytes, gathered at the save: elastickit keeps one copy
of non-tensor state), `train_state` and any other `states`. So `elastickit convert ROOT DST --to
dcp` gives a checkpoint torchtitan's own manager loads.

How a save works: `save` records references and returns; the tensors are copied in the background
while the next step's forward and backward run, and a fence before the next optimizer step (a
global optimizer step pre-hook, so it runs before torchtitan's own step hooks such as MoE load
balancing) waits only if the copy is not done; then the checkpoint flows down the tiers. The only
collective on the training thread is the gather of the dataloader states (a few KB). torchtitan's
own `model.state_dict()` does not run at a save (its fused-QKV hook gathers and copies `wqkv`
through DTensor ops, most of a save's time): `_ModelState` gives the same tensors with one row
copy per fused tensor.

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
from torch.distributed.tensor import DTensor
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


class _Rows:
    """The Checkpointer's piece rule for the fused-QKV rows this manager copies itself: each of
    `wq`, `wk`, `wv` (weight, bias) is this rank's rows of it, one box of the logical tensor.
    Every other tensor (and any restore target) gets the default pieces; no rules are recorded
    in the manifest (`to_json`): the logical tensors are plain ones."""

    def __init__(self) -> None:
        self.table: dict[str, tuple[torch.Tensor, Any]] = {}  # name -> (the buffer, its pieces)

    def piece_rule(self, layout: Any, rank: int) -> Any:
        def rule(name: str, t: torch.Tensor) -> Any:
            hit = self.table.get(name)
            return hit[1] if hit is not None and hit[0] is t else None

        return rule

    def to_json(self) -> list[Any]:
        return []


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t  # as torchtitan's _shares_storage


def qkv_rows(lo: int, hi: int, head_dim: int, heads_per_kv: int) -> list[tuple[torch.Tensor, int]]:
    """Where q, k and v sit in rows [lo, hi) of a fused `wqkv` (torchtitan's
    FusedQKVLinear: per kv head, `heads_per_kv` q heads, then k, then v, `head_dim` rows each):
    for each of q, k, v, (the local row indices, i.e. minus `lo`, the first logical row). The
    rows of one part in [lo, hi) are consecutive rows of its logical tensor."""
    group = (heads_per_kv + 2) * head_dim
    rows = torch.arange(lo, hi)
    g, w = rows // group, rows % group
    q_len = heads_per_kv * head_dim
    out = []
    for start, length in ((0, q_len), (q_len, head_dim), (q_len + head_dim, head_dim)):
        mask = (w >= start) & (w < start + length)
        logical = (g * length + w - start)[mask]
        first = int(logical[0]) if logical.numel() else 0
        out.append(((rows[mask] - lo), first))
    return out


class _Split:
    """One fused-QKV tensor (`wqkv.weight` or `.bias`) split into this rank's rows of
    `wq`/`wk`/`wv`, into buffers that keep their storage (copied into at every save)."""

    def __init__(self, module: Any, param: str, keys: tuple[str, str, str], table: dict[str, Any]) -> None:
        from elastickit.checkpoint.format.items import LogicalSpec, Piece
        from elastickit.checkpoint.plan.pieces import default_pieces

        fused = getattr(module.wqkv, param)
        self.src = _local(fused)
        (box,), (spec,) = default_pieces(keys[0], fused)  # raises if the shard is not one box
        lo, hi = box.offsets[0], box.offsets[0] + box.lengths[0]
        n_kv = spec.shape[0] // ((module.heads_per_kv + 2) * module.head_dim)
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, local row indices)
        self.tensors: dict[str, torch.Tensor] = {}
        for key, (idx, first), per_kv in zip(
            keys, qkv_rows(lo, hi, module.head_dim, module.heads_per_kv),
            (module.heads_per_kv * module.head_dim, module.head_dim, module.head_dim), strict=True,
        ):
            buf = self.src.new_empty((idx.numel(), *self.src.shape[1:]))
            lengths = tuple(buf.shape)
            pieces = (Piece(logical=key, offsets=(first, *box.offsets[1:]), lengths=lengths,
                            stored_offsets=(0,) * len(lengths)),) if buf.numel() else ()
            shape = (n_kv * per_kv, *spec.shape[1:])
            table[key] = (buf, (pieces, (LogicalSpec(name=key, dtype=spec.dtype, shape=shape),)))
            self.copies.append((buf, idx.to(self.src.device)))
            self.tensors[key] = buf

    def copy(self) -> None:
        for buf, idx in self.copies:
            torch.index_select(self.src, 0, idx, out=buf)


# (the state dict, the fused splits, and what keeps it valid: (table, name, tensor, data_ptr) of
# every parameter and buffer, in its module's `_parameters` or `_buffers`)
_Plan = tuple[dict[str, Any], list[_Split], list[tuple[dict[str, Any], str, Any, int]]]


class _ModelState:
    """The model's tensors as torchtitan's `ModelWrapper.state_dict()` gives them (the same keys,
    the same logical tensors), at the cost of one row copy per fused QKV tensor per save.

    ModelWrapper runs the model's `state_dict()` at every call, hooks included: torchtitan's
    FusedQKVLinear hook gathers `wqkv` whole (a collective under FSDP) and splits it into new
    `wq`/`wk`/`wv` tensors, which ModelWrapper then copies into its cache. That DTensor work on
    the training thread was most of a save's blocking (7 of 10 ms for the llama3 debug model).
    Here the model's other tensors are its parameters and buffers themselves, taken once and
    kept while each is the same object on the same storage, and each fused QKV tensor is split
    with one `index_select` per part into buffers that hold this rank's rows only (no gather;
    `_Rows` says which rows of the logical tensor they are). A model whose `state_dict()` has
    any other computed entry (another fusing hook, extra state) falls back to ModelWrapper's.
    """

    def __init__(self, wrapper: ModelWrapper, rows: _Rows, fence: Any) -> None:
        self.wrapper, self.rows, self.fence = wrapper, rows, fence
        self._plan: _Plan | None = None
        self.fallback = False

    def invalidate(self) -> None:
        self._plan = None

    def prepare(self) -> None:
        """Take the model's state-dict structure (at the manager's construction, so that the
        first save does not pay for it; again when a parameter has changed since)."""
        self._plan = self._build()
        self.fallback = self._plan is None

    def state_dict(self) -> dict[str, Any]:
        self.fence()  # the previous snapshot may still be copying the buffers
        if not self.fallback and (self._plan is None or not self._valid()):
            self.prepare()
        if self._plan is None:
            self.rows.table.clear()
            return self.wrapper.state_dict()
        sd, splits, _ = self._plan
        with torch.no_grad():
            for s in splits:
                s.copy()
        return sd

    def _valid(self) -> bool:
        assert self._plan is not None
        return all(table.get(n) is t and _local(t).data_ptr() == ptr for table, n, t, ptr in self._plan[2])

    def _build(self) -> _Plan | None:
        from torchtitan.models.common.attention import FusedQKVLinear

        parts = self.wrapper.model
        fused = [m for part in parts for m in part.modules() if isinstance(m, FusedQKVLinear)]
        made: dict[int, tuple[Any, str, int]] = {}  # id(tensor its hook made) -> (module, param, q/k/v)

        def record(module: Any, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
            for param in ("weight", "bias"):
                for i, part in enumerate(("wq", "wk", "wv")):
                    t = state_dict.get(f"{prefix}{part}.{param}")
                    if t is not None:
                        made[id(t)] = (module, param, i)

        hooks = [m.register_state_dict_post_hook(record) for m in fused]  # after the split hook
        try:
            full = {k: v for part in parts for k, v in part.state_dict().items()}
        finally:
            for h in hooks:
                h.remove()
        owned: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        checks = []
        for part in parts:
            for m in part.modules():
                for table in (m._parameters, m._buffers):
                    for n, t in table.items():
                        if t is not None:
                            loc = _local(t)
                            owned.add((loc.data_ptr(), tuple(loc.shape), loc.stride()))
                            checks.append((table, n, t, loc.data_ptr()))
        sd: dict[str, Any] = {}
        groups: dict[tuple[int, str], tuple[Any, str, list[str | None]]] = {}
        for k, v in full.items():
            hit = made.get(id(v))
            if hit is not None:
                groups.setdefault((id(hit[0]), hit[1]), (hit[0], hit[1], [None, None, None]))[2][hit[2]] = k
                continue
            loc = _local(v) if isinstance(v, torch.Tensor) else None
            if loc is None or (loc.data_ptr(), tuple(loc.shape), loc.stride()) not in owned:
                log.info("elastickit: the model's state dict entry %s is computed; saving through "
                         "torchtitan's ModelWrapper.state_dict()", k)
                return None
            sd[k] = v
        self.rows.table.clear()
        splits = []
        for module, param, keys in groups.values():
            if None in keys:
                return None
            try:
                s = _Split(module, param, tuple(keys), self.rows.table)  # type: ignore[arg-type]
            except ValueError as e:  # a shard that is not one box of wqkv
                log.info("elastickit: %s; saving through torchtitan's ModelWrapper.state_dict()", e)
                return None
            splits.append(s)
            sd.update(s.tensors)
        return {k: sd[k] for k in full}, splits, checks


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
        rows = _Rows()
        self.checkpointer = Checkpointer(
            self.folder, every=config.interval, tiers=tiers, lazy="always",
            keep_last=config.keep_latest_k or None, rules=rows,
        )
        self.model_state = _ModelState(self.model, rows, self.checkpointer.fence)
        self.model_state.prepare()
        # lazy="always": every saved tensor is copied in the background, and torchtitan changes
        # them only in an optimizer step. A global pre-hook runs before any optimizer's own
        # hooks (torchtitan's MoE load balancing updates its expert bias in one).
        self._hook = register_optimizer_step_pre_hook(
            lambda *_a, **_k: self.checkpointer.fence()
        )

    def _state(self, *, loading: bool) -> dict[str, Any]:
        """The model's tensors at the top level and the other states by name (when loading,
        without those in `exclude_from_loading`)."""
        state: dict[str, Any] = dict(self.model.state_dict() if loading else self.model_state.state_dict())
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
        self.model_state.invalidate()
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
