"""A Hugging Face-style safetensors model (`model.safetensors` or shards plus
`model.safetensors.index.json`) as a `LogicalSource`. Keys become `model/<key>`, so that the
converted checkpoint restores into `{"model": module}`; `convert --to safetensors` strips the
prefix again."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from elastickit.checkpoint.errors import DataError, RequestError

from .source import LogicalTensorInfo

INDEX = "model.safetensors.index.json"
RANK_FILE = re.compile(r"^rank-\d{5}\.safetensors$")
PREFIX = "model/"


def _files(path: str) -> list[str]:
    if os.path.isfile(os.path.join(path, INDEX)):
        with open(os.path.join(path, INDEX), "rb") as f:
            raw = f.read()
        try:
            weight_map = json.loads(raw)["weight_map"]  # ValueError: not UTF-8, not JSON
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}/{INDEX} has no readable weight_map ({e})", path=path) from e
        files = set(weight_map.values())
        # Shard names are file names in this directory: nothing else (no path) is read.
        bad = sorted(repr(f) for f in files if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", ".."))
        if bad:
            raise DataError(
                f"{path}/{INDEX} maps tensors to {', '.join(bad[:3])}, not file names in {path}", path=path
            )
        return sorted(files)
    return sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))


def is_hf_model(path: str) -> bool:
    """A directory of safetensors files without an elastickit manifest."""
    try:
        if not os.path.isdir(path) or os.path.exists(os.path.join(path, "manifest.json")):
            return False
        files = _files(path)
        # rank-<r>.safetensors without a manifest is an uncommitted elastickit checkpoint
        return bool(files) and not all(RANK_FILE.match(f) for f in files)
    except (OSError, DataError):
        return False


class HfSource:
    """The tensors of every safetensors file of a model directory (memory-mapped)."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.path = path
        self.step = 0
        self.rules: tuple[dict[str, Any], ...] = ()
        self._where: dict[str, str] = {}
        self._tensors: dict[str, LogicalTensorInfo] = {}
        files = _files(path)
        if not files:
            raise RequestError(f"{path} holds no .safetensors files", path=path)
        for name in files:
            fpath = os.path.join(path, name)
            if not os.path.isfile(fpath):
                raise DataError(f"{fpath} is listed in {INDEX} but missing", path=fpath)
            try:
                with safe_open(fpath, framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        sl = f.get_slice(key)
                        logical = PREFIX + key
                        self._where[logical] = fpath
                        self._tensors[logical] = LogicalTensorInfo(
                            name=logical, dtype=sl.get_dtype(), shape=tuple(sl.get_shape())
                        )
            except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
                if isinstance(e, DataError):
                    raise
                raise DataError(
                    f"{fpath} is not a readable safetensors file ({e}); it may be truncated or "
                    "not a safetensors file at all",
                    path=fpath,
                ) from e

    def tensors(self) -> dict[str, LogicalTensorInfo]:
        return dict(self._tensors)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._where[name], framework="pt") as f:
            return f.get_tensor(name[len(PREFIX) :])

    def objects(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def open_hf(path: str, **_: Any) -> HfSource:
    """Open a safetensors model directory."""
    return HfSource(path)
