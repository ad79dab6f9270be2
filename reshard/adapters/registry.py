"""Foreign and native checkpoint formats, seen through one logical view.

A source adapter is registered by format name with a detector and an opener:

    register_source("dcp", detect=is_dcp_checkpoint, open=open_dcp)

The opener returns a `LogicalSource`: the logical tensors (name -> dtype, shape), a reader that
yields one whole logical tensor at a time (so a conversion holds one tensor plus what the
writer buffers), and the non-tensor state as JSON. `elastickit convert` picks the source with
`--from` (or the first detector that says yes for `auto`) and writes it with a target writer.
The DeepSpeed adapter plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from elastickit.checkpoint.errors import RequestError

from .source import LogicalSource


@dataclass(frozen=True, slots=True)
class SourceFormat:
    """A registered source: `detect(path)` says whether it can read `path`; `open(path, **options)`
    opens it."""

    name: str
    detect: Callable[[str], bool]
    open: Callable[..., LogicalSource]


_SOURCES: dict[str, SourceFormat] = {}


def register_source(
    name: str, *, detect: Callable[[str], bool], open: Callable[..., LogicalSource]
) -> None:
    """Register (or replace) the source format `name`."""
    _SOURCES[name] = SourceFormat(name, detect, open)


def detect_format(path: str) -> str:
    """The first registered format whose detector accepts `path` (RequestError if none)."""
    _builtin()
    for fmt in _SOURCES.values():
        if fmt.detect(path):
            return fmt.name
    raise RequestError(
        f"{path} is not a checkpoint of any known format ({', '.join(_SOURCES)}); name one with --from",
        path=path,
    )


def open_source(path: str, fmt: str = "auto", **options: Any) -> LogicalSource:
    """Open `path` as format `fmt` (`auto`: detect it)."""
    _builtin()
    name = detect_format(path) if fmt == "auto" else fmt
    if name not in _SOURCES:
        raise RequestError(
            f"unknown source format {fmt!r}; use auto or one of {', '.join(_SOURCES)}"
        )
    return _SOURCES[name].open(path, **options)


@dataclass
class _Loaded:
    done: bool = False


_STATE = _Loaded()


def _builtin() -> None:
    """Register the formats that ship with elastickit (once)."""
    if _STATE.done:
        return
    _STATE.done = True
    from . import dcp, native

    register_source(
        "elastickit", detect=native.is_elastickit_checkpoint, open=native.open_elastickit
    )
    register_source("dcp", detect=dcp.is_dcp_checkpoint, open=dcp.open_dcp)
    from . import deepspeed_source, hf

    register_source(
        "deepspeed",
        detect=deepspeed_source.is_deepspeed_checkpoint,
        open=deepspeed_source.open_deepspeed_source,
    )
    # Last: any directory of .safetensors files (a Hugging Face model) without a manifest.
    register_source("safetensors", detect=hf.is_hf_model, open=hf.open_hf)


def iter_tensors(src: LogicalSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Every logical tensor of `src`, one at a time, sorted by name."""
    for name in sorted(src.tensors()):
        yield name, src.read(name)
