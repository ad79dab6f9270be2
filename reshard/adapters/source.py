"""What every source adapter gives: a checkpoint seen as logical tensors.

The adapters (native, dcp, hf, deepspeed_source) implement `LogicalSource`; the registry
(`registry.py`) imports the adapters, never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True, slots=True, kw_only=True)
class LogicalTensorInfo:
    """A logical tensor of a source: its safetensors dtype name and global shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


class LogicalSource(Protocol):
    """A checkpoint as logical tensors. `convert` calls `tensors`, then `read` once per name
    (in any order), `objects`, and finally `close`.

    `step` is the training step the source was saved at (0 when it does not say); `rules` are
    the resharding rules in the manifest's JSON form (`RuleSet.to_json`), empty when unknown."""

    step: int
    rules: tuple[dict[str, Any], ...]

    def tensors(self) -> dict[str, LogicalTensorInfo]:
        """Every logical tensor, by name."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """The whole logical tensor `name`, on the host."""
        ...

    def objects(self) -> dict[str, Any]:
        """Non-tensor state in the manifest's JSON encoding (`elastickit.checkpoint.format.values`:
        tuples, bytes and BytesIO tagged); a value that cannot be kept raises, naming it."""
        ...

    def close(self) -> None: ...
