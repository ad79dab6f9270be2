"""From a user's training state to the format's items, and back.

A state maps names to `nn.Module`s, `torch.optim.Optimizer`s, objects with
`state_dict()/load_state_dict()` (the `Stateful` protocol of torch.distributed.checkpoint),
tensors, or JSON-able values (DESIGN.md section 7a). Modules and optimizers go through
`torch.distributed.checkpoint.state_dict`, so FSDP2 / DTensor models yield their local shards
with global offsets, and optimizer state is keyed by parameter name (FQN), not by index: that
is what lets a checkpoint load into another layout.

Logical names: `<state name>/<path>`, where nested dicts and lists join with `/`, e.g.
`model/layers.0.attn.wqkv.weight`, `optim/state/layers.0.attn.wqkv.weight/exp_avg`.
Non-tensor leaves are kept as JSON with tensors replaced by tags and tuples, bytes and BytesIO
values tagged (the format's codec, `elastickit.checkpoint.format.codec`). Which boxes of which logical tensors each tensor holds is
the plan's business (`elastickit.checkpoint.plan.pieces`); this module is the torch side only.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Imported here, not on first use: it takes most of a second, which a first save should not pay.
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from elastickit.checkpoint.errors import RequestError
from elastickit.checkpoint.format.codec import decode, encode, only_tags, tensor_name, tensor_names
from elastickit.checkpoint.format.stfile import torch_dtype
from elastickit.checkpoint.format.values import TUPLE_TAG, tag_of


def _owner_module(optim: torch.optim.Optimizer, state: Mapping[str, Any]) -> nn.Module:
    params = {id(p) for g in optim.param_groups for p in g["params"]}
    owners = [m for m in state.values() if isinstance(m, nn.Module) and params <= {id(p) for p in m.parameters()}]
    if len(owners) != 1:
        raise RequestError(
            "cannot tell which module an optimizer in the state belongs to "
            f"({len(owners)} candidates); put exactly one nn.Module holding all its parameters in the state"
        )
    return owners[0]


class StateDictCache:
    """Reuses the state dicts of modules and optimizers between saves while their tensors stay
    the same objects.

    `get_model_state_dict` / `get_optimizer_state_dict` recompute every FQN on each call (tens of
    milliseconds for a model of a few hundred tensors); their values are the live tensors, which
    training updates in place, so the same dict serves the next save. A parameter, buffer or
    optimizer state that is replaced (not updated in place) changes the signature and the dict is
    rebuilt. An optimizer's param groups (learning rate, ...) are re-read on every save.
    """

    def __init__(self) -> None:
        # The signatures hold the objects themselves (compared with `is`), so that an id can
        # never be reused by a new tensor while an entry refers to the old one.
        self._entries: dict[int, tuple[tuple[Any, ...], Any]] = {}  # optimizers
        self._module_entries: dict[int, tuple[tuple[Any, ...], tuple[int, ...], Any]] = {}
        self._owners: dict[tuple[str, int], nn.Module] = {}
        # module -> its submodules (the signature walks their own dicts, which is far cheaper
        # than `parameters()`; a replaced submodule shows in its parent's `_modules`).
        self._modules: dict[int, tuple[nn.Module, list[nn.Module], bool]] = {}
        # path -> (the cached dict flattened there last, its tree, its tensors)
        self._flat: dict[str, tuple[Any, Any, dict[str, torch.Tensor]]] = {}

    def _submodules(self, m: nn.Module, *, fresh: bool = False) -> tuple[list[nn.Module], bool]:
        hit = self._modules.get(id(m))
        if fresh or hit is None or hit[0] is not m:
            mods = list(m.modules())
            # A module computing extra state (FP8 scales, ...) gives a new value on every
            # state_dict() call: such a model is never served from the cache.
            extra = any(type(x).get_extra_state is not nn.Module.get_extra_state for x in mods)
            hit = (m, mods, extra)
            self._modules[id(m)] = hit
        return hit[1], hit[2]

    @staticmethod
    def _module_sig(m: nn.Module, mods: list[nn.Module]) -> tuple[tuple[Any, ...], tuple[int, ...]]:
        """The objects that make up the module tree, and the storages of its tensors."""
        sig: list[Any] = [m]
        for x in mods:
            sig.extend(x._parameters.values())
            sig.append(None)
            sig.extend(x._buffers.values())
            sig.append(None)
            sig.extend(x._modules.values())
            sig.append(None)
        # `p.data = t` keeps the object and swaps its storage: the state dict's detached views
        # would then be stale, so the storages are part of the signature too.
        ptrs = tuple(getattr(t, "_local_tensor", t).data_ptr() for t in sig if isinstance(t, torch.Tensor))
        return tuple(sig), ptrs

    @staticmethod
    def _optim_sig(o: torch.optim.Optimizer) -> tuple[Any, ...]:
        sig: list[Any] = [o]
        for g in o.param_groups:
            for p in g["params"]:
                sig.append(p)
                sig.extend(o.state.get(p, {}).values())
                sig.append(None)
        return tuple(sig)

    @staticmethod
    def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
        return len(a) == len(b) and all(map(operator.is_, a, b))

    def model(self, m: nn.Module) -> dict[str, Any]:
        mods, extra = self._submodules(m)
        if extra:
            return get_model_state_dict(m)
        objs, ptrs = self._module_sig(m, mods)
        hit = self._module_entries.get(id(m))
        if hit is None or not self._same(hit[0], objs) or hit[1] != ptrs:
            mods, extra = self._submodules(m, fresh=True)
            if extra:
                return get_model_state_dict(m)
            hit = (*self._module_sig(m, mods), get_model_state_dict(m))
            self._module_entries[id(m)] = hit
        return hit[2]

    def flatten(self, sd: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
        """`_flatten` of a dict this cache returned, reusing the tree while it is the same dict."""
        hit = self._flat.get(path)
        if hit is None or hit[0] is not sd:
            mine: dict[str, torch.Tensor] = {}
            hit = (sd, encode(sd, path, mine), mine)
            self._flat[path] = hit
        tensors.update(hit[2])
        return hit[1]

    def owner(self, o: torch.optim.Optimizer, state: Mapping[str, Any]) -> nn.Module:
        """The module of `state` that holds the optimizer's parameters (remembered while it is
        still in the state and the optimizer's entry is valid)."""
        key = ("owner", id(o))
        hit = self._owners.get(key)
        if hit is not None and any(m is hit for m in state.values()) and id(o) in self._entries:
            return hit
        found = _owner_module(o, state)
        self._owners[key] = found
        return found

    def optimizer(self, owner: nn.Module, o: torch.optim.Optimizer) -> dict[str, Any]:
        hit = self._entries.get(id(o))
        sig = self._optim_sig(o)
        if hit is None or not self._same(hit[0], sig):
            sd = get_optimizer_state_dict(owner, o)
            hit = (self._optim_sig(o), sd)  # get_optimizer_state_dict may create the state
            self._entries[id(o)] = hit
        sd = hit[1]
        groups = []
        for cached, live in zip(sd["param_groups"], o.param_groups, strict=True):
            fresh = {k: v for k, v in live.items() if k != "params"}
            fresh["params"] = cached["params"]
            groups.append(fresh)
        return {"state": sd["state"], "param_groups": groups}


def state_dicts(state: Mapping[str, Any], cache: StateDictCache | None = None) -> dict[str, Any]:
    """Each state entry as a state dict (modules and optimizers by FQN), JSON values as they are."""
    out: dict[str, Any] = {}
    for name, obj in state.items():
        if "/" in name:
            raise RequestError(f"state name {name!r} contains '/'; use a plain name such as 'model'")
        if isinstance(obj, nn.Module):
            out[name] = cache.model(obj) if cache is not None else get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            owner = cache.owner(obj, state) if cache is not None else _owner_module(obj, state)
            out[name] = cache.optimizer(owner, obj) if cache is not None else get_optimizer_state_dict(owner, obj)
        elif isinstance(obj, torch.Tensor):
            out[name] = obj
        elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
            out[name] = obj.state_dict()
        else:
            out[name] = obj
    return out


@dataclass(slots=True)
class FlatState:
    """A state, flattened: tensors by logical name and the JSON tree of everything else."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    #: entries that are modules or optimizers: on load their own tree says where tensors go.
    owned: set[str] = field(default_factory=set)


def flatten_state(
    state: Mapping[str, Any], cache: StateDictCache | None = None
) -> tuple[FlatState, dict[str, Any]]:
    """Flatten a state; also returns the state dicts (needed again to load into them)."""
    sds = state_dicts(state, cache)
    flat = FlatState()
    for name, sd in sds.items():
        obj = state[name]
        if cache is not None and isinstance(obj, nn.Module):
            flat.objects[name] = cache.flatten(sd, name, flat.tensors)
        elif cache is not None and isinstance(obj, torch.optim.Optimizer):
            # The per-parameter state is the cached dict; the param groups are read afresh.
            flat.objects[name] = {
                "state": cache.flatten(sd["state"], f"{name}/state", flat.tensors),
                "param_groups": encode(sd["param_groups"], f"{name}/param_groups", flat.tensors),
            }
        else:
            flat.objects[name] = encode(sd, name, flat.tensors)
        if isinstance(obj, nn.Module | torch.optim.Optimizer):
            flat.owned.add(name)
    return flat, sds


def _rekey(saved: Any, target: Any) -> Any:
    """Saved JSON dict keys are strings; give them back the target's key types (int keys)."""
    if isinstance(saved, dict) and isinstance(target, Mapping):
        by_str = {str(k): k for k in target}
        return {by_str.get(k, k): _rekey(v, target.get(by_str.get(k, k))) for k, v in saved.items()}
    if isinstance(saved, list | tuple) and isinstance(target, list | tuple):
        return type(saved)(_rekey(v, target[i] if i < len(target) else None) for i, v in enumerate(saved))
    return saved


def missing_tensors(saved_objects: Mapping[str, Any], flat_target: FlatState) -> dict[str, None]:
    """Logical tensors tagged in the saved trees that the target state does not have yet."""
    found: dict[str, None] = {}
    for name in flat_target.objects:
        if name in saved_objects:
            saved = saved_objects[name]
            tree = overlay_tree(saved, flat_target.objects[name]) if name in flat_target.owned else saved
            found.update((n, None) for n in tensor_names(tree) if n not in flat_target.tensors)
    return found


def new_tensor(dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A host tensor for a logical tensor the target state lacks (loaded whole)."""
    return torch.empty(shape, dtype=torch_dtype(dtype))


def apply_state(
    state: dict[str, Any] | Mapping[str, Any],
    sds: Mapping[str, Any],
    saved_objects: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Load the filled tensors and the saved JSON back into every state entry.

    Modules and optimizers go through `set_model_state_dict` / `set_optimizer_state_dict`;
    Stateful objects through `load_state_dict`; plain values replace the entry of `state`.
    """
    all_tensors = dict(tensors)
    for name, obj in state.items():
        if name not in saved_objects:
            raise RequestError(
                f"the checkpoint has no state {name!r} (it has {sorted(saved_objects)}); "
                "restore with the names that were saved"
            )
        saved = saved_objects[name]
        if isinstance(obj, nn.Module | torch.optim.Optimizer):
            # Its own tree, with the saved non-tensor values: a pipeline stage takes only its
            # layers, a whole model takes every stage's (rank 0's tree lists only stage 0).
            saved = overlay_tree(saved, encode(sds[name], name, {}))
        sd = _rekey(decode(saved, all_tensors), sds[name])
        if isinstance(obj, nn.Module):
            set_model_state_dict(obj, sd)
        elif isinstance(obj, torch.optim.Optimizer):
            set_optimizer_state_dict(_owner_module(obj, state), obj, sd)
        elif isinstance(obj, torch.Tensor):
            pass  # filled in place
        elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
            obj.load_state_dict(sd)
        elif isinstance(state, dict):
            if isinstance(obj, dict) and isinstance(sd, dict):
                obj.clear()
                obj.update(sd)
            else:
                state[name] = sd


def overlay_tree(saved: Any, target: Any) -> Any:
    """The tree to load into a module's or optimizer's state: the target's own structure and
    tensor names, with the saved non-tensor values where the checkpoint has them.

    A pipeline stage restores only its own layers even if the checkpoint holds others, and a
    checkpoint saved by stages restores into a whole model even though rank 0's tree lists only
    its own stage: the tensors come from the manifest by name, the tree only says where they go.
    Lists of strings (a param group's FQNs) are the target's.
    """
    if tag_of(target) == TUPLE_TAG and isinstance(saved, list):
        saved = {TUPLE_TAG: saved}  # saved before tuples were tagged
    if isinstance(target, list) and tag_of(saved) == TUPLE_TAG:
        saved = saved[TUPLE_TAG]
    if isinstance(target, dict):
        if tensor_name(target) is not None:
            return target
        s = saved if isinstance(saved, dict) and tensor_name(saved) is None else {}
        out = {k: overlay_tree(s.get(k), v) for k, v in target.items()}
        out.update({k: v for k, v in s.items() if k not in out and not only_tags(v)})
        return out
    if isinstance(target, list):
        if all(isinstance(x, str) for x in target) and target:
            return target
        s = saved if isinstance(saved, list) else []
        return [overlay_tree(s[i] if i < len(s) else None, v) for i, v in enumerate(target)]
    return target if saved is None or isinstance(saved, dict) else saved
