"""Each rank's RNG states (torch, CUDA, python, numpy) as JSON, never pickle."""

from __future__ import annotations

import base64
import random
from collections.abc import Mapping
from typing import Any

import torch


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_capture() -> dict[str, Any]:
    """This process's RNG states, captured raw (cheap: the training thread calls it every save).

    `rng_encode` turns the capture into JSON, off the training thread.
    """
    raw: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raw["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        raw["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return raw


def rng_encode(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What `rng_capture` returned, as JSON-able data."""
    version, internal, gauss = raw["python"]  # random.getstate(): (3, 625 ints, gauss)
    out: dict[str, Any] = {"torch": _b64(raw["torch"]), "python": [version, list(internal), gauss]}
    if "cuda" in raw:
        out["cuda"] = [_b64(s) for s in raw["cuda"]]
    if "numpy" in raw:
        kind, keys, pos, has_gauss, np_gauss = raw["numpy"]
        out["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(np_gauss)]
    return out


def set_rng_state(d: Mapping[str, Any]) -> None:
    """Restore what `rng_encode` returned."""
    torch.set_rng_state(_unb64(d["torch"]))
    random.setstate(_to_tuples(d["python"]))
    if "cuda" in d and torch.cuda.is_available() and len(d["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in d["cuda"]])
    if "numpy" in d:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = d["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
