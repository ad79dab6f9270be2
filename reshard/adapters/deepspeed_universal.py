"""Writing DeepSpeed's universal checkpoint format from elastickit's logical view.

The output is the layout `python -m deepspeed.checkpoint.ds_to_universal` produces (DeepSpeed
0.19), which DeepSpeed loads with `"checkpoint": {"load_universal": true}` at any data-parallel
world size::

    <out>/zero/<param>/fp32.pt, exp_avg.pt, exp_avg_sq.pt   one atom per state
    <out>/zero/<param>/step.pt                               ZeRO-1/2 only
    <out>/zero/optimizer_state.pt                            the optimizer's global state
    <out>/*model_states.pt                                   copied from the source
    <parent of out>/latest_universal                         text: the name of <out>

Atoms, exactly as ds_to_universal writes them:

- ZeRO-1/2 sources: `{"cat_dim": 0, "param": tensor}` with the parameter's global shape;
  `step.pt` is the bare step the optimizer saved; parameters the optimizer does not own (frozen
  ones, buffers, tied names) get `{"param": module_tensor.float()}` in `fp32.pt`.
- ZeRO-3 sources: each atom is the bare flattened tensor; no step.pt (DeepSpeed reads the step
  from `optimizer_state.pt`).
- `optimizer_state.pt`: rank 0's optimizer-file state; ZeRO-1/2 without the three partitioned
  entries (`base_optimizer_state`, `param_slice_mappings`, `single_partition_of_fp32_groups`),
  ZeRO-3 as saved; both with `param_groups` added.

Unlike ds_to_universal it makes one pass, one parameter at a time, with no temporary fragment
files and without importing DeepSpeed.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch

from ...checkpoint.errors import DataError, RequestError
from .deepspeed import DeepSpeedCheckpoint
from .deepspeed_pickle import save_pt

_ZERO12_PARTITIONED = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")


@dataclass(frozen=True, slots=True, kw_only=True)
class UniversalReport:
    """What `write_universal` wrote.

    Attributes:
        out_dir: the universal checkpoint folder.
        num_params: parameters with optimizer atoms.
        num_files: files written or copied.
        bytes_written: their total size.
        seconds: wall time.
    """

    out_dir: str
    num_params: int
    num_files: int
    bytes_written: int
    seconds: float


def _save(obj: Any, path: str) -> int:
    torch.save(obj, path)
    return os.path.getsize(path)


def write_universal(ck: DeepSpeedCheckpoint, out_dir: str, *, overwrite: bool = False,
                    write_latest: bool = True) -> UniversalReport:
    """Write `ck` as a DeepSpeed universal checkpoint into `out_dir`.

    Args:
        ck: an open DeepSpeed checkpoint (ZeRO 1, 2 or 3).
        out_dir: the folder to create; its parent receives `latest_universal`.
        overwrite: replace an existing `out_dir`.
        write_latest: write `<parent>/latest_universal` naming `out_dir`.

    Raises:
        RequestError: `out_dir` exists and `overwrite` is False.
        DataError: the source has no ZeRO optimizer state (ZeRO-0) to convert.
    """
    start = time.perf_counter()
    if ck.zero_stage == 0:
        raise DataError(
            f"{ck.folder} has no ZeRO optimizer files (ZeRO stage 0); DeepSpeed's universal format "
            "needs ZeRO-1, 2 or 3 state", path=ck.folder)
    if os.path.exists(out_dir):
        if not overwrite:
            raise RequestError(f"{out_dir} already exists; remove it or pass overwrite=True", path=out_dir)
        shutil.rmtree(out_dir)
    zero_dir = os.path.join(out_dir, "zero")
    os.makedirs(zero_dir)
    stage3 = ck.zero_stage == 3
    num_files = num_bytes = num_params = 0
    written: set[str] = set()

    for p, states in ck.iter_tensors(kinds=("trainable",)):
        if p.numel == 0 and not stage3:
            continue  # ds_to_universal has no fragment for it; the module copy below covers it
        pdir = os.path.join(zero_dir, p.name)
        os.makedirs(pdir, exist_ok=True)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            tensor = states[key]
            atom = tensor.reshape(-1) if stage3 else {"cat_dim": 0, "param": tensor}
            num_bytes += _save(atom, os.path.join(pdir, f"{key}.pt"))
            num_files += 1
        if not stage3 and states.get("step") is not None:
            num_bytes += _save(states["step"], os.path.join(pdir, "step.pt"))
            num_files += 1
        written.add(p.name)
        num_params += 1

    if not stage3:
        # As ds_to_universal: every module entry without an atom (frozen, buffers, tied names)
        # gets its saved value as fp32, so a universal load finds a complete model.
        for name, tensor in ck.model_state(0)["module"].items():
            if name in written or not isinstance(tensor, torch.Tensor):
                continue
            pdir = os.path.join(zero_dir, name)
            os.makedirs(pdir, exist_ok=True)
            num_bytes += _save({"param": tensor.float()}, os.path.join(pdir, "fp32.pt"))
            num_files += 1

    path = os.path.join(zero_dir, "optimizer_state.pt")
    save_pt(_optimizer_global_state(ck), path)
    num_bytes += os.path.getsize(path)
    num_files += 1

    for src in ck.model_files:
        dst = os.path.join(out_dir, os.path.basename(src))
        shutil.copy2(src, dst)
        num_bytes += os.path.getsize(dst)
        num_files += 1

    if write_latest:
        parent, name = os.path.split(os.path.normpath(os.path.abspath(out_dir)))
        with open(os.path.join(parent, "latest_universal"), "w") as f:
            f.write(name)
    return UniversalReport(out_dir=out_dir, num_params=num_params, num_files=num_files,
                           bytes_written=num_bytes, seconds=time.perf_counter() - start)


def _optimizer_global_state(ck: DeepSpeedCheckpoint) -> dict[str, Any]:
    """`zero/optimizer_state.pt`'s content, built as ds_to_universal builds it."""
    osd = ck.optimizer_file_state(0)
    if ck.zero_stage == 3:
        out = dict(osd)
        out["param_groups"] = out["optimizer_state_dict"]["param_groups"]
        return out
    base = osd.get("base_optimizer_state")
    if not isinstance(base, dict) or "param_groups" not in base:
        raise DataError(
            f"{ck.optim_files[0]} was saved with elastic_checkpoint (no param_groups); DeepSpeed's "
            "universal loader needs them", path=ck.optim_files[0])
    out = {k: v for k, v in osd.items() if k not in _ZERO12_PARTITIONED}
    out["param_groups"] = base["param_groups"]
    return out
