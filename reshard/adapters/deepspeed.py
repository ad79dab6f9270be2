"""Reading DeepSpeed ZeRO 0/1/2/3 checkpoints directly, as elastickit's logical view.

A DeepSpeed checkpoint folder (`<save_dir>/<tag>/`, `<save_dir>/latest` naming the tag) holds:

- `mp_rank_00_model_states.pt` (ZeRO 0-2) or `zero_pp_rank_<dp>_mp_rank_00_model_states.pt`
  (ZeRO-3, one per data-parallel rank): the module state dict (ZeRO-3: empty placeholders),
  `param_shapes` (per optimizer group, name -> shape, in flattening order), frozen parameters,
  `shared_params` (tied names), the lr scheduler, step counters and the client state;
- `[bf16_]zero_pp_rank_<dp>_mp_rank_00_optim_states.pt`, one per data-parallel rank: that
  rank's slice of every flat fp32 master buffer and of Adam's moments.

The mapping from a rank's flat buffer back to parameters is DESIGN.md's `flat(zero)` rule, made
explicit as `FlatFragment`s computed from the shapes alone (`deepspeed_layout`; no live optimizer,
no DeepSpeed):

- ZeRO-1/2: each group's parameters are laid end to end (plus `param_alignment_paddings` after
  each), padded to `world * P`, and rank r holds elements `[r*P, (r+1)*P)`; the saved fp32 slice
  of the last rank drops its trailing padding (`group_paddings`).
- ZeRO-3: every parameter is split on its own into `ceil(numel / world)` pieces, padded; rank r's
  flat buffer of a sub-group is its piece of each parameter, in order.

Where the file also records DeepSpeed's own `param_slice_mappings`, they are checked against the
computed fragments; a disagreement is a `DataError`, never a silent guess.

`DeepSpeedCheckpoint` maps the files (`ptfile`, without importing torch) and yields one parameter
at a time, so converting a checkpoint never holds more than one parameter's states plus the pages
the kernel keeps mapped. Internally tensors are numpy arrays (bfloat16 through `ml_dtypes`);
`tensors`, `iter_tensors`, `model_tensor` and `fp32_state_dict` hand out torch tensors, `arrays`
and `pieces` numpy ones (the universal writer uses these and never imports torch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, Self

import numpy as np

from ...checkpoint.errors import DataError, RequestError
from .deepspeed_layout import (
    KINDS,
    DeepSpeedParam,
    FlatFragment,
    zero3_layout,
    zero3_partition,
    zero12_layout,
)
from .deepspeed_pickle import FragmentAddress, load_pt, to_json
from .ptfile import Pieces, np_dtype, release

__all__ = ["KINDS", "STATE_KEYS", "DeepSpeedCheckpoint", "DeepSpeedParam", "FlatFragment",
           "is_deepspeed_checkpoint", "open_deepspeed", "resolve_folder"]

STATE_KEYS: tuple[str, ...] = ("fp32", "exp_avg", "exp_avg_sq", "step")
"""The per-parameter states of the logical view (DeepSpeed universal's names)."""

_MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_RE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")

# Keys of a model-states file that DeepSpeed itself writes; everything else is client state.
_DS_MODEL_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
    "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config", "ds_version",
    "checkpoint_parallel_dimensions", "universal_checkpoint_info", "num_experts",
})


def resolve_folder(path: str, tag: str | None = None) -> tuple[str, str]:
    """The checkpoint folder and tag for `path`: a save_dir (with `latest`) or a tag folder.

    Raises:
        RequestError: `path` is not a directory or holds no DeepSpeed checkpoint.
    """
    if not os.path.isdir(path):
        raise RequestError(f"{path} is not a directory; give a DeepSpeed save_dir or tag folder", path=path)
    if tag is not None:
        folder = os.path.join(path, tag)
        if not os.path.isdir(folder):
            raise RequestError(f"{folder} does not exist; check the tag", path=folder)
        return folder, tag
    if any(_MODEL_RE.match(f) for f in os.listdir(path)):
        return path, os.path.basename(os.path.normpath(path))
    for latest in ("latest", "latest_universal"):
        marker = os.path.join(path, latest)
        if os.path.isfile(marker):
            with open(marker, "rb") as f:
                raw = f.read()
            try:
                found = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                found = ""
            # The tag names a folder beside `latest`; anything else (a path, binary junk) is not
            # followed: a damaged or hostile marker must not send the reader elsewhere.
            if not found or os.path.basename(found) != found or found in (".", "..") or not found.isprintable():
                raise DataError(
                    f"{marker} does not name a tag folder (it holds {raw[:40]!r}); it is damaged: give the "
                    "tag folder itself",
                    path=marker,
                )
            return resolve_folder(path, found)
    raise RequestError(
        f"{path} holds no *_model_states.pt and no 'latest' file; is it a DeepSpeed checkpoint?", path=path
    )


def is_deepspeed_checkpoint(path: str) -> bool:
    """True if `path` looks like a DeepSpeed save_dir or tag folder (for `--from auto`)."""
    try:
        folder, _ = resolve_folder(path)
    except RequestError:
        return False
    return any(_MODEL_RE.match(f) for f in os.listdir(folder))


class DeepSpeedCheckpoint:
    """A DeepSpeed checkpoint seen as logical tensors: read it one parameter at a time.

    Use as a context manager or call `close()`. Nothing but the small model-states metadata is
    read at open; the optimizer files are memory-mapped on first use.

    Attributes:
        folder: the tag folder. tag: its name.
        zero_stage: 0, 1, 2 or 3. dp_world_size: number of ZeRO partitions.
        dtype: dtype of the module weights ("float32", "bfloat16", "float16").
        params: name -> DeepSpeedParam, in the module's state-dict order.
        model_files: the model-states files (ZeRO-3: one per rank, rank order).
        optim_files: the optimizer-states files, rank order (empty for ZeRO-0).
        meta: JSON-able metadata: step counters, lr scheduler, client state, optimizer groups.
    """

    def __init__(self, path: str, *, tag: str | None = None, trust_pickle: bool = False) -> None:
        self.folder, self.tag = resolve_folder(path, tag)
        self._trust = trust_pickle
        self._optim: dict[int, dict[str, Any]] = {}
        self._rank_models: dict[int, dict[str, Any]] = {}
        names = sorted(os.listdir(self.folder))
        if any("expert_" in n and n.endswith("model_states.pt") or n.startswith("expp_rank_") for n in names):
            raise DataError(
                f"{self.folder} is a DeepSpeed MoE checkpoint (expert files); elastickit reads dense "
                "ZeRO checkpoints only", path=self.folder)
        if any(n.startswith("layer_") and n.endswith("model_states.pt") for n in names):
            raise DataError(
                f"{self.folder} is a pipeline-parallel (PipelineModule) checkpoint; elastickit reads "
                "data-parallel ZeRO checkpoints only (convert with tp=pp=1 first)",
                path=self.folder,
            )
        models = sorted((m for m in map(_MODEL_RE.match, names) if m), key=lambda m: int(m.group(1) or 0))
        optims = sorted((m for m in map(_OPTIM_RE.match, names) if m), key=lambda m: int(m.group(2)))
        if not models:
            raise DataError(f"{self.folder} holds no *_model_states.pt file", path=self.folder)
        if {m.group(2) for m in models} != {"00"} or {m.group(3) for m in optims} - {"00"}:
            raise DataError(
                f"{self.folder} is a tensor-parallel checkpoint (several mp_rank_XX files); "
                "elastickit reads data-parallel ZeRO checkpoints only",
                path=self.folder,
            )
        self.model_files = [os.path.join(self.folder, m.group(0)) for m in models]
        self.optim_files = [os.path.join(self.folder, m.group(0)) for m in optims]
        if [int(m.group(2)) for m in optims] != list(range(len(optims))):
            raise DataError(
                f"{self.folder} lacks optimizer files for some ranks (found ranks "
                f"{[int(m.group(2)) for m in optims]}); was the save interrupted?",
                path=self.folder,
            )
        with open(self.model_files[0], "rb") as f:
            if f.read(1) == b"{":  # a JSON marker of elastickit's DeepSpeed checkpoint engine
                raise RequestError(
                    f"{self.folder} was saved through elastickit's DeepSpeed engine; its data is the "
                    f"elastickit checkpoint under {os.path.join(os.path.dirname(self.folder), 'elastickit')}",
                    path=self.folder)
        self._model = self._rank_model(0)
        self.dp_world_size = int(self._model.get("dp_world_size") or max(1, len(self.optim_files)))
        if self.optim_files and len(self.optim_files) != self.dp_world_size:
            raise DataError(
                f"{self.folder} has {len(self.optim_files)} optimizer files but dp_world_size "
                f"{self.dp_world_size}; the checkpoint is incomplete or mixed",
                path=self.folder,
            )
        self.zero_stage = self._detect_stage()
        if self.zero_stage == 3 and len(self.model_files) != self.dp_world_size:
            raise DataError(
                f"{self.folder} has {len(self.model_files)} ZeRO-3 model-states files but dp_world_size "
                f"{self.dp_world_size}; the checkpoint is incomplete",
                path=self.folder,
            )
        self.dtype = self._detect_dtype()
        self.params = self._build_params()
        self.meta = self._build_meta()

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the mapped files (their memory goes with the last array that views them)."""
        self._optim.clear()
        self._rank_models.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw files ----------------------------------------------------------------------------

    def _rank_model(self, rank: int) -> dict[str, Any]:
        if rank not in self._rank_models:
            sd = load_pt(self.model_files[rank], trust_pickle=self._trust)
            if not isinstance(sd, dict) or "module" not in sd:
                raise DataError(f"{self.model_files[rank]} is not a DeepSpeed model-states file",
                                path=self.model_files[rank])
            self._rank_models[rank] = sd
        return self._rank_models[rank]

    def optimizer_file_state(self, rank: int) -> dict[str, Any]:
        """The `optimizer_state_dict` of rank `rank`'s optimizer file (memory-mapped)."""
        if rank not in self._optim:
            path = self.optim_files[rank]
            sd = load_pt(path, trust_pickle=self._trust)
            osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
            if not isinstance(osd, dict):
                raise DataError(f"{path} has no optimizer_state_dict; not a ZeRO optimizer file", path=path)
            self._optim[rank] = osd
        return self._optim[rank]

    def model_state(self, rank: int = 0) -> dict[str, Any]:
        """The raw model-states dict of `rank` (ZeRO 0-2: the one file)."""
        return self._rank_model(rank if self.zero_stage == 3 else 0)

    # -- layout -------------------------------------------------------------------------------

    def _detect_stage(self) -> int:
        if not self.optim_files:
            return 0
        osd = self.optimizer_file_state(0)
        if "fp32_flat_groups" in osd:
            return 3
        if "single_partition_of_fp32_groups" in osd:
            # DeepSpeed's BF16_Optimizer (bf16 without ZeRO) writes no zero_stage: a ZeRO-1 layout.
            return int(osd.get("zero_stage", 1))
        raise DataError(f"{self.optim_files[0]} holds neither ZeRO-1/2 nor ZeRO-3 fp32 groups",
                        path=self.optim_files[0])

    def _detect_dtype(self) -> str:
        for name, t in self._model["module"].items():
            if isinstance(t, np.ndarray) and _is_float(t) and name not in self._buffer_names():
                return t.dtype.name
        return "float32"

    def _buffer_names(self) -> set[str]:
        return set(self._model.get("buffer_names") or ())

    def _param_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        shapes = self._model.get("param_shapes")
        if shapes is None:
            return []
        if isinstance(shapes, dict):  # very old DeepSpeed: one group
            shapes = [shapes]
        return [{n: tuple(int(d) for d in s) for n, s in g.items()} for g in shapes]

    def _build_params(self) -> dict[str, DeepSpeedParam]:
        module = self._model["module"]
        buffers = self._buffer_names()
        shared = dict(self._model.get("shared_params") or {})
        frozen_shapes = {n: tuple(int(d) for d in s)
                         for n, s in (self._model.get("frozen_param_shapes") or {}).items()}
        trainable: dict[str, DeepSpeedParam] = {}
        if self.zero_stage in (1, 2):
            trainable = self._zero12_params()
        elif self.zero_stage == 3:
            trainable = self._zero3_params()

        params: dict[str, DeepSpeedParam] = {}
        order = list(module) + [n for n in trainable if n not in module] + [
            n for n in frozen_shapes if n not in module]
        for name in order:
            if name in params:
                continue
            if name in trainable:
                params[name] = trainable[name]
            elif name in shared:
                params[name] = DeepSpeedParam(name=name, shape=(), kind="tied", tied_to=shared[name])
            elif name in buffers:
                params[name] = DeepSpeedParam(name=name, shape=tuple(module[name].shape), kind="buffer")
            elif self.zero_stage == 3:
                if name not in frozen_shapes:
                    raise DataError(
                        f"{self.model_files[0]}: {name} is neither trainable, frozen, tied nor a buffer",
                        path=self.model_files[0], tensor=name)
                params[name] = self._zero3_frozen(name, frozen_shapes[name])
            elif self.zero_stage == 0:
                params[name] = DeepSpeedParam(name=name, shape=tuple(module[name].shape), kind="weight")
            else:
                shape = frozen_shapes.get(name, tuple(module[name].shape))
                params[name] = DeepSpeedParam(name=name, shape=shape, kind="frozen")
        for name, p in list(params.items()):  # a tied name has its source's shape
            if p.kind == "tied":
                src = params.get(p.tied_to or "")
                if src is None:
                    raise DataError(f"{self.model_files[0]}: {name} is tied to {p.tied_to}, which is missing",
                                    path=self.model_files[0], tensor=name)
                params[name] = DeepSpeedParam(name=name, shape=src.shape, kind="tied", tied_to=src.name)
        return params

    def _zero12_params(self) -> dict[str, DeepSpeedParam]:
        world = self.dp_world_size
        shapes = self._param_shapes()
        osds = [self.optimizer_file_state(r) for r in range(world)]
        unpadded = "zero_stage" in osds[0]  # ZeRO-1/2 save fp32 without the group padding
        fp32 = [o["single_partition_of_fp32_groups"] for o in osds]
        if len(fp32[0]) != len(shapes):
            raise DataError(
                f"{self.optim_files[0]} has {len(fp32[0])} fp32 groups but param_shapes lists "
                f"{len(shapes)}; model and optimizer files do not belong together",
                path=self.optim_files[0])
        partition_sizes = []
        for g in range(len(shapes)):
            sizes = [fp32[r][g].size + ((osds[r].get("group_paddings") or [0] * len(shapes))[g]
                                           if unpadded else 0) for r in range(world)]
            if any(s != sizes[0] for s in sizes):
                raise DataError(
                    f"{self.folder}: ranks disagree on the partition size of group {g} ({sizes})",
                    path=self.folder)
            partition_sizes.append(sizes[0])
        try:
            out = zero12_layout(shapes, partition_sizes, world, osds[0].get("param_alignment_paddings"))
        except ValueError as e:
            raise DataError(f"{self.folder}: {e}", path=self.folder) from e
        for g in range(len(shapes)):
            for r in range(world):
                used = max((f.src_offset + f.numel for p in out.values() if p.group == g
                            for f in p.fragments if f.rank == r), default=0)
                if used > fp32[r][g].size:
                    raise DataError(
                        f"{self.optim_files[r]}: group {g} holds {fp32[r][g].size} fp32 values but "
                        f"the parameters need {used}", path=self.optim_files[r])
        self._check_slice_mappings(out, osds)
        return out

    def _check_slice_mappings(self, params: dict[str, DeepSpeedParam], osds: Sequence[dict]) -> None:
        """Compare the computed fragments with DeepSpeed's own record, where there is one."""
        for r, osd in enumerate(osds):
            mappings = osd.get("param_slice_mappings")
            if not mappings:
                continue
            for g, group_map in enumerate(mappings):
                for name, addr in group_map.items():
                    if not isinstance(addr, FragmentAddress):
                        continue
                    frags = [f for f in params[name].fragments if f.rank == r] if name in params else []
                    if len(frags) != 1 or frags[0].group != g or (
                            frags[0].src_offset, frags[0].numel) != (addr.start, addr.numel):
                        raise DataError(
                            f"{self.optim_files[r]}: param_slice_mappings puts {name} at "
                            f"start={addr.start} numel={addr.numel} in group {g}, which disagrees "
                            "with its param_shapes; the checkpoint layout is not one elastickit knows",
                            path=self.optim_files[r], tensor=name)

    def _zero3_params(self) -> dict[str, DeepSpeedParam]:
        world = self.dp_world_size
        out, sizes = zero3_layout(self._param_shapes(), world)
        for r in range(world):
            held = [int(t.size) for t in self.optimizer_file_state(r)["fp32_flat_groups"]]
            if held != sizes:
                raise DataError(
                    f"{self.optim_files[r]}: ZeRO-3 sub-groups hold {held} values but their parameters "
                    f"need {sizes}", path=self.optim_files[r])
        return out

    def _zero3_frozen(self, name: str, shape: tuple[int, ...]) -> DeepSpeedParam:
        return zero3_partition(name, shape, self.dp_world_size, group=-1, kind="frozen")

    # -- metadata -----------------------------------------------------------------------------

    def _build_meta(self) -> dict[str, Any]:
        m = self._model
        client = {k: to_json(v) for k, v in m.items() if k not in _DS_MODEL_KEYS}
        meta: dict[str, Any] = {
            "format": "deepspeed",
            "tag": self.tag,
            "zero_stage": self.zero_stage,
            "dp_world_size": self.dp_world_size,
            "mp_world_size": int(m.get("mp_world_size") or 1),
            "dtype": self.dtype,
            "ds_version": m.get("ds_version"),
            "global_steps": m.get("global_steps"),
            "global_samples": m.get("global_samples"),
            "skipped_steps": m.get("skipped_steps"),
            "lr_scheduler": to_json(m.get("lr_scheduler")),
            "data_sampler": to_json(m.get("data_sampler")),
            "ds_config": to_json(m.get("ds_config")),
            "client_state": client,
        }
        if self.optim_files:
            osd = self.optimizer_file_state(0)
            groups = self._param_groups(osd)
            meta["param_groups"] = [to_json({k: v for k, v in pg.items() if k != "params"})
                                    for pg in groups]
            meta["loss_scaler"] = to_json(osd.get("loss_scaler"))
        elif isinstance(m.get("optimizer"), dict):
            meta["param_groups"] = [to_json({k: v for k, v in pg.items() if k != "params"})
                                    for pg in m["optimizer"].get("param_groups", [])]
        return meta

    @staticmethod
    def _param_groups(osd: dict[str, Any]) -> list[dict[str, Any]]:
        if "base_optimizer_state" in osd:
            base = osd["base_optimizer_state"]
            return list(base.get("param_groups", [])) if isinstance(base, dict) else []
        return list(osd.get("optimizer_state_dict", {}).get("param_groups", []))

    # -- tensors ------------------------------------------------------------------------------

    def _group_state(self, rank: int, group: int) -> dict[str, Any]:
        """Adam's state of one flat group on one rank (exp_avg, exp_avg_sq, step)."""
        osd = self.optimizer_file_state(rank)
        if self.zero_stage == 3:
            inner = osd["optimizer_state_dict"]["state"]
            return inner.get(group, {})
        base = osd["base_optimizer_state"]
        if isinstance(base, dict):  # a torch optimizer state_dict: one flat param per group
            pid = base["param_groups"][group]["params"][0]
            return base["state"].get(pid, {})
        state = dict(base[group])  # elastic checkpoint: a lean list per group, step saved aside
        if "step" not in state and "base_optimizer_state_step" in osd:
            state["step"] = osd["base_optimizer_state_step"]
        return state

    def _flat(self, rank: int, group: int, state: str) -> np.ndarray:
        if group == -1:
            raise AssertionError("frozen fragments are read by model_array")
        osd = self.optimizer_file_state(rank)
        if state == "fp32":
            key = "fp32_flat_groups" if self.zero_stage == 3 else "single_partition_of_fp32_groups"
            value = osd[key][group]
        else:
            value = self._group_state(rank, group).get(state)
        if not isinstance(value, np.ndarray) or value.ndim != 1:
            raise DataError(f"{self.optim_files[rank]}: group {group} has no flat optimizer state '{state}'",
                            path=self.optim_files[rank])
        return value

    def pieces(self, name: str, state: str) -> Pieces:
        """One state ("fp32", "exp_avg" or "exp_avg_sq") of trainable parameter `name` as the
        slices of the ranks' flat buffers that make it up, in order, without copying them."""
        p = self.params[name]
        if p.kind != "trainable":
            raise RequestError(f"{name} is {p.kind}, not a trainable parameter with optimizer state",
                               tensor=name)
        parts, dtype, at = [], np.dtype(np.float32), 0
        for f in sorted(p.fragments, key=lambda f: f.dst_offset):
            src = self._flat(f.rank, f.group, state)
            if f.src_offset + f.numel > src.size or f.dst_offset != at:
                raise DataError(
                    f"{self.optim_files[f.rank]}: {state} of group {f.group} does not hold {p.name}'s "
                    f"elements {f.dst_offset}..{f.dst_offset + f.numel}",
                    path=self.optim_files[f.rank], tensor=p.name)
            parts.append(src[f.src_offset:f.src_offset + f.numel])
            dtype, at = src.dtype, at + f.numel
        if at != p.numel:
            raise DataError(f"{self.folder}: the optimizer files hold {at} of {p.name}'s {p.numel} elements",
                            path=self.folder, tensor=p.name)
        return Pieces(tuple(p.shape), dtype, tuple(parts))

    def _step(self, p: DeepSpeedParam) -> Any:
        rank = p.fragments[0].rank if p.fragments else 0
        group = p.group or 0
        step = self._group_state(rank, group).get("step")
        return step.copy() if isinstance(step, np.ndarray) else step

    def model_array(self, name: str) -> np.ndarray:
        """A frozen parameter or buffer as saved (its own dtype), or a trainable one's module copy
        (ZeRO 0-2 only; ZeRO-3 saves placeholders). A view of the mapped file: do not write to it."""
        p = self.params[name]
        if p.kind == "tied":
            return self.model_array(p.tied_to or "")
        if p.kind == "frozen" and self.zero_stage == 3:
            parts = [self._rank_model(f.rank)["frozen_param_fragments"][name].reshape(-1)[:f.numel]
                     for f in p.fragments]
            return np.concatenate(parts).reshape(p.shape) if parts else np.empty(p.shape, np.float32)
        fragments = self._model.get("frozen_param_fragments") or {}
        if p.kind == "frozen" and name in fragments:
            return fragments[name].reshape(p.shape)
        return self._model["module"][name]

    def model_tensor(self, name: str) -> Any:
        """`model_array(name)` as a new torch tensor."""
        return to_torch(self.model_array(name).copy())

    def arrays(self, name: str, states: Sequence[str] = STATE_KEYS) -> dict[str, Any]:
        """The requested states of one parameter, as new numpy arrays of its global shape.

        Trainable parameters have "fp32" (master weight), "exp_avg", "exp_avg_sq" (arrays) and
        "step" (an array or a number, as saved). Frozen parameters, buffers and ZeRO-0 weights
        have only "fp32" (the saved value as float32). A tied name returns its source's states.
        """
        p = self.params[name]
        if p.kind == "tied":
            return self.arrays(p.tied_to or "", states)
        out: dict[str, Any] = {}
        if p.kind != "trainable":
            if "fp32" in states:
                out["fp32"] = self.model_array(name).astype(np.float32)
            return out
        for state in states:
            out[state] = self._step(p) if state == "step" else self.pieces(name, state).join()
        return out

    def tensors(self, name: str, states: Sequence[str] = STATE_KEYS) -> dict[str, Any]:
        """`arrays(name, states)` as torch tensors (a step saved as a number stays a number)."""
        return {k: to_torch(v) for k, v in self.arrays(name, states).items()}

    def iter_tensors(self, states: Sequence[str] = STATE_KEYS,
                     kinds: Sequence[str] = ("trainable", "frozen", "buffer", "weight"),
                     ) -> Iterator[tuple[DeepSpeedParam, dict[str, Any]]]:
        """Yield (param, torch states) one parameter at a time, in the module's order."""
        for p in self.params.values():
            if p.kind in kinds:
                out = self.tensors(p.name, states)
                self._release(p, states)
                yield p, out

    def _release(self, p: DeepSpeedParam, states: Sequence[str]) -> None:
        """Give back the mapped pages up to the end of `p`'s fragments: the buffers are read
        front to back, so nothing before them is needed again (re-reading stays correct)."""
        if p.kind != "trainable":
            return
        for f in p.fragments:
            for state in states:
                if state != "step":
                    release(self._flat(f.rank, f.group, state), f.src_offset + f.numel)

    def release_pages(self, value: Any) -> None:
        """Give back the mapped pages of every tensor in `value` (a tensor or a container)."""
        if isinstance(value, np.ndarray):
            release(value)
        elif isinstance(value, dict):
            for v in value.values():
                self.release_pages(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.release_pages(v)

    def fp32_state_dict(self) -> dict[str, Any]:
        """Every weight as fp32 under its state-dict name, tied names included: what DeepSpeed's
        `get_fp32_state_dict_from_zero_checkpoint` returns, read without DeepSpeed."""
        out: dict[str, Any] = {}
        for p, t in self.iter_tensors(states=("fp32",)):
            out[p.name] = t["fp32"]
        for p in self.params.values():
            if p.kind == "tied":
                out[p.name] = out[p.tied_to or ""]
        return out


def open_deepspeed(path: str, *, tag: str | None = None, trust_pickle: bool = False) -> DeepSpeedCheckpoint:
    """Open a DeepSpeed checkpoint (save_dir with `latest`, or a tag folder) for reading."""
    return DeepSpeedCheckpoint(path, tag=tag, trust_pickle=trust_pickle)


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype == np_dtype("bfloat16")


def to_torch(value: Any) -> Any:
    """A numpy array as a torch tensor sharing its memory (bfloat16 included); other values as
    they are. Imports torch."""
    if not isinstance(value, np.ndarray):
        return value
    import torch

    a = np.ascontiguousarray(value)
    if a.dtype == np_dtype("bfloat16"):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
