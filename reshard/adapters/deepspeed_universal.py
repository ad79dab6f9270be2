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
files and without importing DeepSpeed or torch (`ptfile`): an atom's bytes go from the ranks'
optimizer files straight into the atom file inside the kernel (`copy_file_range`), never through
this process's memory.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...checkpoint.errors import DataError, RequestError
from ...checkpoint.format.integrity import atomic_write, fsync_dir, fsync_file
from .deepspeed import DeepSpeedCheckpoint
from .deepspeed_pickle import save_pt
from .ptfile import Pieces, write_pt

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
    return write_pt(obj, path)


def _copy(src: str, dst: str) -> int:
    shutil.copy2(src, dst)
    fsync_file(dst)
    return os.path.getsize(dst)


class _Writer:
    """Runs file writes on a few threads while the caller gathers the next parameter.

    At most `max_pending` writes are in flight, which bounds the memory held by gathered
    tensors waiting for the disk. The first failure is raised by `submit` or `finish`.
    """

    def __init__(self, threads: int, max_pending: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ek-ds-write")
        self._pending: deque[Future[int]] = deque()
        self._max = max(1, max_pending)
        self.num_files = 0
        self.num_bytes = 0

    def submit(self, fn: Callable[..., int], *args: Any) -> None:
        while len(self._pending) >= self._max:
            self.num_bytes += self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))
        self.num_files += 1

    def finish(self) -> None:
        try:
            while self._pending:
                self.num_bytes += self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def write_universal(ck: DeepSpeedCheckpoint, out_dir: str, *, overwrite: bool = False,
                     write_latest: bool = True, threads: int = 2) -> UniversalReport:
    """Write `ck` as a DeepSpeed universal checkpoint into `out_dir`.

    Args:
        ck: an open DeepSpeed checkpoint (ZeRO 1, 2 or 3).
        out_dir: the folder to create; its parent receives `latest_universal`.
        overwrite: replace an existing `out_dir`.
        write_latest: write `<parent>/latest_universal` naming `out_dir` (last, after every
            other file is written).
        threads: writer threads (the files are written while the next parameter is gathered).

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
    num_params = 0
    written: set[str] = set()
    writer = _Writer(threads, max_pending=4 * max(1, threads))
    try:
        # The global state first: under ZeRO-3 it holds rank 0's whole flat buffers, whose
        # mapped pages are given back as soon as that file is written.
        global_state = _optimizer_global_state(ck)
        size = save_pt(global_state, os.path.join(zero_dir, "optimizer_state.pt"))
        writer.num_files, writer.num_bytes = 1, size
        ck.release_pages(global_state)
        del global_state

        for p in ck.params.values():
            if p.kind != "trainable" or (p.numel == 0 and not stage3):
                continue  # ds_to_universal has no fragment for an empty one; the module copy covers it
            pdir = os.path.join(zero_dir, p.name)
            os.makedirs(pdir, exist_ok=True)
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                pieces = ck.pieces(p.name, key)
                if stage3:
                    pieces = Pieces((p.numel,), pieces.dtype, pieces.parts)
                atom = pieces if stage3 else {"cat_dim": 0, "param": pieces}
                writer.submit(_save, atom, os.path.join(pdir, f"{key}.pt"))
            step = None if stage3 else ck.arrays(p.name, ("step",)).get("step")
            if step is not None:  # ZeRO-3 keeps the step in optimizer_state.pt only
                writer.submit(_save, step, os.path.join(pdir, "step.pt"))
            written.add(p.name)
            num_params += 1

        if not stage3:
            # As ds_to_universal: every module entry without an atom (frozen, buffers, tied
            # names) gets its saved value as fp32, so a universal load finds a complete model.
            for name, tensor in ck.model_state(0)["module"].items():
                if name in written or not isinstance(tensor, np.ndarray):
                    continue
                pdir = os.path.join(zero_dir, name)
                os.makedirs(pdir, exist_ok=True)
                writer.submit(_save, {"param": tensor.astype(np.float32)}, os.path.join(pdir, "fp32.pt"))

        for src in ck.model_files:
            writer.submit(_copy, src, os.path.join(out_dir, os.path.basename(src)))
    finally:
        writer.finish()

    # Every file was fsynced as it was written; now their directory entries, deepest first,
    # and only then the marker that makes DeepSpeed load this folder: a crash at any instant
    # leaves `latest_universal` naming the previous universal checkpoint, whole.
    for d, _subdirs, _files in os.walk(zero_dir, topdown=False):
        fsync_dir(d)
    parent, name = os.path.split(os.path.normpath(os.path.abspath(out_dir)))
    fsync_dir(out_dir)
    fsync_dir(parent)
    if write_latest:
        atomic_write(os.path.join(parent, "latest_universal"), name)
    return UniversalReport(out_dir=out_dir, num_params=num_params, num_files=writer.num_files,
                           bytes_written=writer.num_bytes, seconds=time.perf_counter() - start)


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
