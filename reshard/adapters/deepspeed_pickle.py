"""Reading and writing DeepSpeed's `.pt` pickles without running DeepSpeed's code (DESIGN.md section 8).

DeepSpeed saves its checkpoints with `torch.save`, and besides tensors, dicts and lists they carry a
few of DeepSpeed's own objects. They are read by `ptfile.read_pt`, whose unpickler allows torch's
tensor machinery (what `torch.load(weights_only=True)` allows) plus exactly the classes listed in
`DEEPSPEED_ALLOWLIST`, each mapped to an inert stand-in class defined here. Nothing of DeepSpeed
(nor torch) is imported or executed while reading, so DeepSpeed need not even be installed.
Anything outside the list fails with a `DataError` naming the file and the class, unless the
caller passes `trust_pickle=True` (a full unpickle: only for files you trust). Tensors come back
as numpy arrays over a read-only-in-practice private mapping of the file.

Writing (`save_pt`) turns the stand-ins back into references to DeepSpeed's real classes, so a
file written here (e.g. the universal format's `zero/optimizer_state.pt`) loads in DeepSpeed as if
DeepSpeed had written it.
"""

from __future__ import annotations

import math
import pickle
import re
import struct
from typing import Any

import numpy as np

from ...checkpoint.errors import DataError
from .ptfile import ChecksumError, read_pt, write_pt


class _Stand_in:
    """Base of the stand-ins: plain attribute bags that remember DeepSpeed's class name."""

    ds_module: str = ""
    ds_name: str = ""

    def to_json(self) -> dict[str, Any]:
        """The object's attributes as plain data, with the DeepSpeed class it stood for."""
        return {"__class__": f"{self.ds_module}.{self.ds_name}", **_jsonable(vars(self))}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.ds_name}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    __hash__ = None  # type: ignore[assignment]


class LossScaler(_Stand_in):
    """Stands in for `deepspeed.runtime.fp16.loss_scaler.LossScaler` (static loss scale)."""

    ds_module, ds_name = "deepspeed.runtime.fp16.loss_scaler", "LossScaler"


class DynamicLossScaler(_Stand_in):
    """Stands in for `deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler` (fp16 runs)."""

    ds_module, ds_name = "deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"


class FragmentAddress(_Stand_in):
    """Stands in for `deepspeed.utils.tensor_fragment.fragment_address`: where a parameter's
    slice starts in one rank's flat partition (`start`) and how long it is (`numel`)."""

    ds_module, ds_name = "deepspeed.utils.tensor_fragment", "fragment_address"
    numel: int
    start: int


class ZeroStage(int):
    """Stands in for `deepspeed.runtime.zero.config.ZeroStageEnum` (an int enum: 0..3)."""

    ds_module, ds_name = "deepspeed.runtime.zero.config", "ZeroStageEnum"

    def __reduce__(self) -> tuple[Any, ...]:
        # The same shape as Enum.__reduce_ex__: ZeroStageEnum(value).
        return (type(self), (int(self),))

    def __repr__(self) -> str:
        return f"ZeroStageEnum({int(self)})"


# The one allowlist: DeepSpeed's full class name -> the inert stand-in that replaces it.
# Found by saving real ZeRO-1/2/3 checkpoints (fp32, bf16) with DeepSpeed 0.19 and listing every
# GLOBAL their pickles hold beyond torch's own tensor machinery.
DEEPSPEED_ALLOWLIST: dict[str, type] = {
    f"{cls.ds_module}.{cls.ds_name}": cls
    for cls in (LossScaler, DynamicLossScaler, FragmentAddress, ZeroStage)
}

_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_pt(path: str, *, trust_pickle: bool = False) -> Any:
    """Load one DeepSpeed `.pt` file; its tensors are numpy arrays mapping the file.

    Args:
        path: the file.
        trust_pickle: if True, unpickle everything (runs whatever code the file names; needs
            DeepSpeed installed for its classes). Only for files you trust.

    Raises:
        DataError: the file is missing, not a torch checkpoint, or needs a class outside
            `DEEPSPEED_ALLOWLIST` (and `trust_pickle` is False).
    """
    try:
        return read_pt(path, allow=DEEPSPEED_ALLOWLIST, trust=trust_pickle)
    except FileNotFoundError as e:
        raise DataError(f"{path} does not exist; is the DeepSpeed checkpoint complete?", path=path) from e
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        if found is None:
            raise DataError(f"{path} is not a readable torch checkpoint: {e}", path=path) from e
        raise DataError(
            f"{path} needs the class {found.group(1)}, which is not on elastickit's DeepSpeed "
            "allowlist; pass --trust-pickle (trust_pickle=True) only if you trust this file",
            path=path,
        ) from e
    except ChecksumError as e:
        raise DataError(f"{path} is corrupt: {e}; restore it from a good copy", path=path) from e
    except (EOFError, OSError, ValueError, struct.error, AttributeError, ImportError, TypeError) as e:
        raise DataError(f"{path} is not a readable torch checkpoint: {e}", path=path) from e
    except (MemoryError, RecursionError, KeyError, IndexError, OverflowError) as e:
        # What a damaged pickle stream makes the unpickler do (a huge length, a deep nesting).
        raise DataError(
            f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e}); it is damaged", path=path
        ) from e


def _jsonable(value: Any) -> Any:
    """Plain JSON data from what DeepSpeed pickles hold (tensors become numbers or shapes)."""
    if isinstance(value, ZeroStage):
        return int(value)
    if isinstance(value, _Stand_in):
        return value.to_json()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.reshape(-1)[0].item() if value.size == 1 else {"tensor_shape": list(value.shape)}
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bool) or value is None:
        return value
    for plain in (int, float, str):  # enums and other subclasses become the plain value
        if isinstance(value, plain):
            return plain(value)
    if hasattr(value, "__dict__"):  # a DeepSpeed object from a trusted (full) unpickle
        return {"__class__": f"{type(value).__module__}.{type(value).__qualname__}", **_jsonable(vars(value))}
    return repr(value)


def to_json(value: Any) -> Any:
    """Public alias of the JSON conversion used for scheduler, client and optimizer state."""
    return _jsonable(value)


def save_pt(obj: Any, path: str) -> int:
    """Write `obj` as a `torch.save` file whose pickle names DeepSpeed's classes where the
    stand-ins stand; returns the file's size.

    Only objects read by `load_pt` (arrays, containers, stand-ins) are expected in `obj`.
    """
    return write_pt(obj, path, names={cls: name for name, cls in DEEPSPEED_ALLOWLIST.items()})
