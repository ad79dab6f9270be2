"""What the save drivers need to know about the job and the run (one object per Checkpointer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..format.manifest import LayoutRecord
from ..tiers import Tiers


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterContext:
    """What the tier workers need to know about the job and the run."""

    rank: int
    world_size: int
    tiers: Tiers
    persistent_root: str
    layout: LayoutRecord
    rules: tuple[dict[str, Any], ...]
    framework: dict[str, str]
    fsync: bool
    peer_group: Any = None  # a dedicated gloo process group for peer copies
    local_root: str = ""  # this rank's directory in the local tier (the run's, see runs.py)
    timeout_s: float = 600.0  # how long a tier waits for the other ranks
