"""elastickit: keep hybrid-parallel PyTorch training alive through failures.

    import elastickit as ek
    ck = ek.Checkpointer("runs/exp1/ckpt")
    step = ck.restore({"model": model, "optim": optimizer})

Heavy modules (torch) load on first use of a public name, so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from elastickit.api import Checkpointer

_LAZY = {
    "Checkpointer": "elastickit.api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'elastickit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["Checkpointer", "__version__"]
