"""Every rank of a layout in one process: save and load checkpoints for N virtual ranks.

Tests, benchmarks and tools use it to write a real multi-rank checkpoint (the real writer, the
real commit protocol) without a process group: each virtual rank runs `write_checkpoint` on its
own thread, and `ThreadCoordinator` is the all-gather between them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from elastickit.checkpoint.drivers.writer import SaveRequest, write_checkpoint
from elastickit.checkpoint.format.directory import StepDir
from elastickit.checkpoint.format.manifest import Manifest
from elastickit.checkpoint.plan.pieces import load_items, save_items
from elastickit.reshard.executor import execute
from elastickit.reshard.layout import ParallelLayout
from elastickit.reshard.planner import plan_reads
from elastickit.reshard.rules import RuleSet


class _Shared:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.cond = threading.Condition()
        self.rounds: dict[int, dict[int, str]] = {}


class ThreadCoordinator:
    """The all-gather of one virtual rank; every rank of a `group` shares one `_Shared`."""

    def __init__(self, shared: _Shared, rank: int, timeout_s: float = 60.0) -> None:
        self._shared = shared
        self._rank = rank
        self._round = 0
        self._timeout = timeout_s

    @classmethod
    def group(cls, world_size: int, timeout_s: float = 60.0) -> list[ThreadCoordinator]:
        shared = _Shared(world_size)
        return [cls(shared, r, timeout_s) for r in range(world_size)]

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._shared.world_size

    def all_gather(self, value: Any, *, phase: str) -> list[Any]:
        sh, n = self._shared, self._round
        self._round += 1
        with sh.cond:
            sh.rounds.setdefault(n, {})[self._rank] = json.dumps(value)
            sh.cond.notify_all()
            if not sh.cond.wait_for(
                lambda: len(sh.rounds[n]) == sh.world_size, timeout=self._timeout
            ):
                raise TimeoutError(f"virtual ranks did not all reach {phase!r}")
            return [json.loads(sh.rounds[n][r]) for r in range(sh.world_size)]


def save_virtual(
    root: str,
    step: int,
    layout: ParallelLayout,
    states: Sequence[Mapping[str, torch.Tensor]],
    rules: RuleSet | None = None,
    *,
    objects: dict[str, Any] | None = None,
    fsync: bool = False,
) -> Manifest:
    """Save one checkpoint as every rank of `layout` would: `states[r]` holds rank r's physical
    tensors by name (flattened state names such as `model/w`)."""
    if len(states) != layout.world_size:
        raise ValueError(
            f"states has {len(states)} ranks but layout {layout} has {layout.world_size}"
        )
    record = layout.to_record()
    coords = ThreadCoordinator.group(layout.world_size)

    def one(rank: int) -> Manifest:
        rule = rules.piece_rule(record, rank) if rules is not None else None
        items = save_items(states[rank], rule)
        req = SaveRequest(
            root=root,
            step=step,
            items=items,
            objects=objects or {},
            layout=record,
            rules=tuple(rules.to_json()) if rules is not None else (),
            fsync=fsync,
        )
        return write_checkpoint(req, coords[rank])

    with ThreadPoolExecutor(layout.world_size) as pool:
        manifests = list(pool.map(one, range(layout.world_size)))  # every rank's errors surface
    return manifests[0]


def load_virtual(
    ckpt_dir: str,
    layout: ParallelLayout,
    rank: int,
    tensors: Mapping[str, torch.Tensor],
    rules: RuleSet | None = None,
    *,
    strict: bool = True,
) -> Manifest:
    """Fill rank `rank`'s physical `tensors` (in place) from `ckpt_dir`, resharding as needed."""
    source = StepDir(ckpt_dir)
    rule = rules.piece_rule(layout.to_record(), rank) if rules is not None else None
    items = load_items(tensors, rule)
    plan = plan_reads(source.manifest, [(it.key, it.pieces) for it in items], strict=strict)
    with torch.no_grad():
        execute(plan, source, {it.key: it.tensor for it in items})
    return source.manifest
