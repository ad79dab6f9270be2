"""elastickit's own checkpoints as a `LogicalSource`: each logical tensor is planned and read
whole through the planner and executor (checksums verified)."""

from __future__ import annotations

import os
from typing import Any

import torch
from elastickit.checkpoint.format.directory import StepDir, is_checkpoint_dir, resolve
from elastickit.checkpoint.format.items import Piece
from elastickit.checkpoint.format.manifest import STEP_DIR_RE
from elastickit.checkpoint.format.stfile import torch_dtype

from ..executor import execute
from ..planner import plan_reads
from .source import LogicalTensorInfo


def is_elastickit_checkpoint(path: str) -> bool:
    """A checkpoint directory with a manifest, or a root holding some."""
    if is_checkpoint_dir(path):
        return True
    try:
        return os.path.isdir(path) and any(STEP_DIR_RE.match(n) for n in os.listdir(path))
    except OSError:
        return False


class ElastickitSource:
    """One committed elastickit checkpoint (a root resolves to its latest)."""

    def __init__(self, path: str) -> None:
        self.path = resolve(path)
        self.source = StepDir(self.path)
        self.manifest = self.source.manifest
        self.step = self.manifest.step
        self.rules = tuple(self.manifest.rules)

    def tensors(self) -> dict[str, LogicalTensorInfo]:
        return {
            n: LogicalTensorInfo(name=n, dtype=t.dtype, shape=t.shape)
            for n, t in self.manifest.tensors.items()
        }

    def read(self, name: str) -> torch.Tensor:
        t = self.manifest.tensors[name]
        out = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        plan = plan_reads(
            self.manifest, [(name, (Piece.whole(name, (0,) * len(t.shape), t.shape),))]
        )
        with torch.no_grad():
            execute(plan, self.source, {name: out})
        return out

    def objects(self) -> dict[str, Any]:
        return dict(self.manifest.objects)

    def close(self) -> None:
        pass


def open_elastickit(path: str, **_: Any) -> ElastickitSource:
    """Open an elastickit checkpoint (directory or root)."""
    return ElastickitSource(path)
