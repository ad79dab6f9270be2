"""DeepSpeed's `save_checkpoint` / `load_checkpoint` through elastickit's lazy multi-tier writer.

Enable it with one line after `deepspeed.initialize`::

    from elastickit.integrations.deepspeed_engine import install
    install(engine)                      # or install(engine, tiers=..., keep_last=3)

`engine.save_checkpoint(save_dir)` then returns after recording references: the tensors are
copied in the background and flow down elastickit's tiers (`<save_dir>/elastickit/step-<N>/`,
safetensors + a checksummed manifest, no pickle); the only wait is a fence before the next
optimizer step. DeepSpeed's own file names under `<save_dir>/<tag>/` become small JSON markers
pointing there, so `engine.load_checkpoint(save_dir)` and DeepSpeed's `latest` work unchanged.
`ElastickitCheckpointEngine.wait()` blocks until every checkpoint is durable; call `close()` (it
waits) before the process exits, since DeepSpeed never tells a non-decoupled engine it is done.

How DeepSpeed's state dicts fit the format: every tensor becomes a logical tensor named
`ds/<file>/<path>` (each rank's files have their own names); everything else is a JSON skeleton
stored as a uint8 tensor `ds/<file>/__skeleton__`, in which DeepSpeed's few objects (its loss
scaler, ZeroStageEnum, fragment_address) are tagged by class name and rebuilt on load only if
the name is on `DEEPSPEED_ALLOWLIST`.

Crash safety: DeepSpeed writes `latest` as soon as `save_checkpoint` returns; if the process
dies before elastickit commits that step, `load_checkpoint` fails with a message naming the tag
and the last committed step instead of loading a partial checkpoint.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch

from elastickit.checkpoint.errors import DataError, RequestError
from elastickit.checkpoint.format import codec
from elastickit.checkpoint.format.manifest import step_dir_name
from elastickit.reshard.adapters.deepspeed_pickle import DEEPSPEED_ALLOWLIST

MARKER_FORMAT = "elastickit-deepspeed-marker"

try:  # DeepSpeed is optional: the module imports without it, `install` needs it.
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
        CheckpointCommitInfo,
        CheckpointEngine,
    )
except ImportError:  # pragma: no cover - exercised only without DeepSpeed
    CheckpointEngine = object  # type: ignore[assignment,misc]
    CheckpointCommitInfo = Any  # type: ignore[assignment,misc]


# -- DeepSpeed state dict <-> tensors + JSON ------------------------------------------------


def encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of a DeepSpeed state dict (the format's codec, exact mode); tensors
    collected under `path`-based names."""
    try:
        return codec.encode(value, path, tensors, exact=True, allow=DEEPSPEED_ALLOWLIST)
    except RequestError as e:
        raise RequestError(f"DeepSpeed {e}; use DeepSpeed's default checkpoint engine for this model") from None


def decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode`: DeepSpeed's objects come back as DeepSpeed's classes."""
    return codec.decode(node, tensors, exact=True, classes=_allowed_class)


def _allowed_class(name: str) -> type:
    if name not in DEEPSPEED_ALLOWLIST:
        raise DataError(f"checkpoint names class {name}, which is not on the DeepSpeed allowlist")
    return _deepspeed_class(name)


def _skeleton_tensor(skeleton: Any) -> torch.Tensor:
    data = json.dumps(skeleton, separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# -- the engine ----------------------------------------------------------------------------


class ElastickitCheckpointEngine(CheckpointEngine):  # type: ignore[misc,valid-type]
    """A DeepSpeed checkpoint engine that stores checkpoints with `elastickit.Checkpointer`.

    Args:
        engine: the DeepSpeed engine (for its step counter).
        checkpointer_kwargs: passed to `elastickit.Checkpointer` (tiers, keep_last, fsync, ...),
            whose root is `<save_dir>/elastickit`.
    """

    def __init__(self, engine: Any, **checkpointer_kwargs: Any) -> None:
        super().__init__(None)
        self.name = "ElastickitCheckpointEngine"
        self._engine = engine
        self._kwargs = {"rng": False, "lazy": "always", "every": 1, **checkpointer_kwargs}
        self._checkpointers: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}
        self._info: Any = None
        self._sources: dict[str, Any] = {}
        self.last_blocking_s = 0.0

    def _checkpointer(self, save_dir: str) -> Any:
        root = os.path.join(os.path.abspath(save_dir), "elastickit")
        if root not in self._checkpointers:
            from elastickit.api import Checkpointer

            self._checkpointers[root] = Checkpointer(root, **self._kwargs)
        return self._checkpointers[root]

    # DeepSpeed's interface, in the order DeepSpeed calls it during save_checkpoint.

    def create(self, info: CheckpointCommitInfo) -> None:
        """Start a checkpoint (every rank)."""
        self._info = info
        self._pending = {}

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        """Record one of DeepSpeed's files: references now, copies later."""
        if self._info is None:
            raise RequestError("ElastickitCheckpointEngine.save called outside save_checkpoint")
        self._pending[path] = state_dict

    def commit(self, info: CheckpointCommitInfo) -> bool:
        """Hand the checkpoint to elastickit (every rank; returns once references are taken)."""
        if info is None or self._info is None:
            return True
        import time

        t0 = time.perf_counter()
        ck = self._checkpointer(info.save_dir)
        step = int(getattr(self._engine, "global_steps", 0))
        tensors: dict[str, torch.Tensor] = {}
        for path, sd in self._pending.items():
            name = os.path.basename(path)
            skeleton = encode(sd, name, tensors)
            tensors[f"{name}/__skeleton__"] = _skeleton_tensor(skeleton)
        # Logical names `ds/<file>/<path>`: each rank's files have names of their own.
        ck.save(step, {"ds": tensors}, force=True)
        for path in self._pending:
            with open(path, "w") as f:
                json.dump({"format": MARKER_FORMAT, "root": "elastickit", "step": step,
                           "file": os.path.basename(path), "tag": info.tag}, f)
        self._pending = {}
        self._info = None
        self.last_blocking_s = time.perf_counter() - t0
        return True

    def fence(self) -> None:
        """Wait until the newest snapshot is copied (installed before each optimizer step)."""
        for ck in self._checkpointers.values():
            ck.fence()

    def wait(self) -> None:
        """Block until every checkpoint taken so far is durable."""
        for ck in self._checkpointers.values():
            ck.wait()

    def load(self, path: str, map_location: Any = None) -> Any:
        """One of DeepSpeed's files: from elastickit if `path` is a marker, else a DeepSpeed
        `.pt` read with `weights_only=True` and DeepSpeed's allowlisted classes (DESIGN.md 8)."""
        marker = _read_marker(path)
        if marker is None:  # a file DeepSpeed's default engine wrote
            return _load_deepspeed_pt(path, map_location)
        tag_dir = os.path.dirname(os.path.abspath(path))
        root = os.path.join(os.path.dirname(tag_dir), marker["root"])
        step_dir = os.path.join(root, step_dir_name(int(marker["step"])))
        source = self._source(step_dir, marker)
        prefix = f"ds/{marker['file']}/"
        skeleton_name = f"{prefix}__skeleton__"
        names = [n for n in source.tensors() if n.startswith(prefix)]
        if skeleton_name not in names:
            raise DataError(f"{step_dir} holds no DeepSpeed file {marker['file']}", path=step_dir)
        skeleton = json.loads(bytes(source.read(skeleton_name).numpy()).decode())
        tensors = {n[len("ds/"):]: source.read(n) for n in names if n != skeleton_name}
        return decode(skeleton, tensors)

    def _source(self, step_dir: str, marker: dict[str, Any]) -> Any:
        if step_dir not in self._sources:
            from elastickit.checkpoint.format.directory import list_checkpoints
            from elastickit.reshard.adapters.native import ElastickitSource

            root = os.path.dirname(step_dir)
            done = [c.step for c in list_checkpoints(root) if c.complete] if os.path.isdir(root) else []
            if int(marker["step"]) not in done:
                raise DataError(
                    f"DeepSpeed tag {marker.get('tag')} points to elastickit step {marker['step']}, which "
                    f"was never committed (interrupted save); committed steps: {sorted(done) or 'none'}",
                    path=step_dir)
            self._sources[step_dir] = ElastickitSource(step_dir)
        return self._sources[step_dir]

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return False

    def close(self) -> None:
        """Wait until every checkpoint is durable, then stop the background writers."""
        self.cleanup()

    def cleanup(self) -> None:
        """Wait for durability and close the checkpointers (DeepSpeed's name for `close`)."""
        for ck in self._checkpointers.values():
            ck.close()
        self._checkpointers.clear()


def _deepspeed_class(name: str) -> type:
    module, _, cls_name = name.rpartition(".")
    return getattr(importlib.import_module(module), cls_name)


def _load_deepspeed_pt(path: str, map_location: Any) -> Any:
    """A `.pt` file of DeepSpeed's, with DeepSpeed's own allowlisted classes (not stand-ins:
    the engine hands the objects back to DeepSpeed)."""
    allowed = [_deepspeed_class(name) for name in DEEPSPEED_ALLOWLIST]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise DataError(
            f"{path} cannot be read with weights_only=True and DeepSpeed's allowlisted classes ({e}); "
            "load it with DeepSpeed's default checkpoint engine if you trust it", path=path) from e


def _read_marker(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; is the DeepSpeed checkpoint complete?", path=path) from None
    if not head.startswith(b"{"):
        return None
    try:
        marker = json.loads(head)
    except ValueError:
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise RequestError("cannot find the torch optimizer inside this DeepSpeed engine to fence on")
    return opt


def install(engine: Any, **checkpointer_kwargs: Any) -> ElastickitCheckpointEngine:
    """Make `engine.save_checkpoint` / `load_checkpoint` use elastickit (the one line to add)."""
    ck_engine = ElastickitCheckpointEngine(engine, **checkpointer_kwargs)
    engine.checkpoint_engine = ck_engine
    # The fence: the background copy must finish before the optimizer changes the tensors.
    _base_optimizer(engine).register_step_pre_hook(lambda *_: ck_engine.fence())
    return ck_engine
