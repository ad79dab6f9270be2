"""What a save copies, from a live torch training state: the items, the JSON objects, which
tensors must be copied before `save` returns, and the fence that keeps the rest consistent.

Laziness (DESIGN.md section 4): what only an optimizer step changes (parameters and optimizer
state) is copied in the background, and an optimizer step pre-hook (`fence`) waits for that copy
before the step changes them; everything else is copied before `save` returns. The memos here
keep a save of an unchanged state at a few microseconds per tensor.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from elastickit.checkpoint.drivers.snapshot import snapshot_bytes
from elastickit.checkpoint.plan.pieces import PieceRule, save_items
from elastickit.state import StateDictCache, flatten_state

LAZY_MODES = ("auto", "always", "never")


@dataclass(frozen=True, slots=True, kw_only=True)
class Capture:
    """One save's view of the state.

    Attributes:
        items: the physical tensors and the logical boxes they hold.
        objects: the non-tensor state, JSON with tensor tags.
        eager: keys copied before `save` returns (the rest are copied in the background).
        nbytes: host bytes the snapshot needs.
    """

    items: list[Any]
    objects: dict[str, Any]
    eager: frozenset[str]
    nbytes: int


class StateCapture:
    """Turns a state into `Capture`s, reusing what did not change between saves.

    `lazy`: "auto" (fenced tensors in the background), "always" (everything in the background),
    "never" (everything before `save` returns). `rule`: the resharding rules' piece rule.
    """

    def __init__(self, lazy: str, rule: PieceRule | None) -> None:
        if lazy not in LAZY_MODES:
            raise ValueError(f"lazy must be 'auto', 'always' or 'never', got {lazy!r}")
        self.lazy = lazy
        self.rule = rule
        self._sd_cache = StateDictCache()
        self._item_memo: dict[str, Any] = {}
        self._prev_items: list[Any] = []  # the last save's items, and their snapshot bytes
        self._prev_bytes = 0
        self._eager_memo: tuple[list[Any], tuple[Any, ...], frozenset[str]] | None = None
        self._hooked: dict[int, Any] = {}

    def capture(self, state: Mapping[str, Any]) -> Capture:
        flat, _ = flatten_state(state, self._sd_cache)
        items = save_items(flat.tensors, self.rule, self._item_memo)
        prev = self._prev_items
        if len(items) == len(prev) and all(map(operator.is_, items, prev)):
            items = prev  # the same list object: what is derived from it is reused
        else:
            self._prev_items, self._prev_bytes = items, snapshot_bytes(items)
        if self.lazy == "never":
            eager = frozenset(it.key for it in items)
        elif self.lazy == "always":
            eager = frozenset()
        else:
            eager = self._eager_keys(items, flat, state)
        return Capture(items=items, objects=flat.objects, eager=eager, nbytes=self._prev_bytes)

    def install_fence(self, state: Mapping[str, Any], fence: Callable[[], None]) -> None:
        """Call `fence` before each step of every optimizer in `state` (once per optimizer)."""
        for obj in state.values():
            if isinstance(obj, torch.optim.Optimizer) and id(obj) not in self._hooked:
                self._hooked[id(obj)] = obj.register_step_pre_hook(fence_hook(obj, fence))

    def remove_fences(self) -> None:
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()

    def _eager_keys(self, items: list[Any], flat: Any, state: Mapping[str, Any]) -> frozenset[str]:
        """Keys of `items` copied before `save` returns: what no optimizer step fences."""
        optims = tuple(
            (o, tuple(p for g in o.param_groups for p in g["params"]))
            for o in state.values()
            if isinstance(o, torch.optim.Optimizer)
        )
        memo = self._eager_memo
        if memo is not None and memo[0] is items and len(memo[1]) == len(optims) and all(
            a[0] is b[0] and len(a[1]) == len(b[1]) and all(map(operator.is_, a[1], b[1]))
            for a, b in zip(memo[1], optims, strict=True)
        ):
            return memo[2]
        eager = frozenset(it.key for it in items) - fenced_keys(flat, state)
        self._eager_memo = (items, optims, eager)
        return eager


def fence_hook(optimizer: torch.optim.Optimizer, fence: Callable[[], None]) -> Any:
    """The step pre-hook that waits for the copy (`fence`) before `optimizer` changes a tensor.

    A step given a closure (Lightning passes its whole training step as one, forward and
    backward included) would wait before the closure runs, leaving the copy nothing to overlap.
    torch's own optimizers evaluate the closure before they change anything, so for them the
    wait moves into the closure, after it returns. Any other optimizer (a subclass included:
    its step may do otherwise) waits before its step starts.
    """
    closure_first = type(optimizer).__module__.startswith("torch.optim.")

    def hook(_opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        positional = len(args) > 1  # args[0] is the optimizer
        closure = args[1] if positional else kwargs.get("closure")
        if closure is None or not closure_first:
            fence()
            return None

        def fenced() -> Any:
            loss = closure()
            fence()
            return loss

        if positional:
            return (args[0], fenced, *args[2:]), kwargs
        return args, {**kwargs, "closure": fenced}

    return hook


def fenced_keys(flat: Any, state: Mapping[str, Any]) -> frozenset[str]:
    """Logical names of tensors that only an optimizer step changes (copied lazily)."""
    ptrs = set()
    for obj in state.values():
        if isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                for p in group["params"]:
                    local = p.to_local() if hasattr(p, "to_local") else p
                    ptrs.add(local.data_ptr())
                    for t in obj.state.get(p, {}).values():
                        if isinstance(t, torch.Tensor):
                            t = t.to_local() if hasattr(t, "to_local") else t
                            ptrs.add(t.data_ptr())
    out = set()
    for name, t in flat.tensors.items():
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.numel() and local.data_ptr() in ptrs:
            out.add(name)
    return frozenset(out)
