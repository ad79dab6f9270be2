"""A DeepSpeed checkpoint as a `LogicalSource` for `elastickit convert --from deepspeed`.

Logical names follow elastickit's state flattening (elastickit/state.py), so that a converted
checkpoint restores with `Checkpointer.restore({"model": model, "optim": optimizer})`:

- `model/<name>`: the fp32 master weight of a trainable parameter; a frozen parameter or buffer
  as saved; a tied name as a copy of its source (a module's state dict lists both).
- `optim/state/<name>/exp_avg`, `.../exp_avg_sq`, `.../step`: Adam's state per parameter.
- objects: `optim/param_groups` (hyperparameters with `params` as parameter names, the form
  `torch.distributed.checkpoint.state_dict` uses) and `deepspeed` (step counters, lr scheduler,
  client state, ZeRO stage, world size) as JSON.

`--to deepspeed-universal` skips the logical detour (and torch): `reshard.convert` calls
`deepspeed_universal.write_universal` on the open `DeepSpeedCheckpoint`.
"""

from __future__ import annotations

from typing import Any

import torch

from ...checkpoint.errors import RequestError
from ...checkpoint.format.stfile import st_dtype
from .deepspeed import DeepSpeedCheckpoint, is_deepspeed_checkpoint

__all__ = ["DeepSpeedSource", "is_deepspeed_checkpoint", "open_deepspeed_source"]


class DeepSpeedSource:
    """Logical tensors of a DeepSpeed ZeRO 0-3 checkpoint (see the module docstring)."""

    def __init__(self, path: str, *, tag: str | None = None, trust_pickle: bool = False) -> None:
        self.checkpoint = DeepSpeedCheckpoint(path, tag=tag, trust_pickle=trust_pickle)
        self.step = int(self.checkpoint.meta.get("global_steps") or 0)
        self.rules: tuple[dict[str, Any], ...] = ()
        self._names: dict[str, tuple[str, str]] = {}  # logical -> (parameter, state)
        self._infos: dict[str, Any] = {}
        from .source import LogicalTensorInfo

        ck = self.checkpoint
        for p in ck.params.values():
            src = ck.params[p.tied_to] if p.kind == "tied" and p.tied_to else p
            model_dtype = torch.float32
            if src.kind in ("frozen", "buffer", "weight"):
                model_dtype = getattr(torch, ck.model_array(src.name).dtype.name)
            self._add(LogicalTensorInfo, f"model/{p.name}", p.name, "model", model_dtype, p.shape)
            if p.kind == "trainable":
                for state in ("exp_avg", "exp_avg_sq"):
                    self._add(LogicalTensorInfo, f"optim/state/{p.name}/{state}", p.name, state,
                              torch.float32, p.shape)
                self._add(LogicalTensorInfo, f"optim/state/{p.name}/step", p.name, "step", torch.float32, ())

    def _add(self, info_cls: Any, logical: str, name: str, state: str, dtype: torch.dtype,
             shape: tuple[int, ...]) -> None:
        self._names[logical] = (name, state)
        self._infos[logical] = info_cls(name=logical, dtype=st_dtype(dtype, what=f"tensor {logical!r}"),
                                        shape=tuple(shape))

    def tensors(self) -> dict[str, Any]:
        """Every logical tensor (name -> LogicalTensorInfo)."""
        return dict(self._infos)

    def read(self, name: str) -> torch.Tensor:
        """One whole logical tensor, gathered from every rank's file."""
        try:
            param, state = self._names[name]
        except KeyError:
            raise RequestError(f"{self.checkpoint.folder} has no logical tensor {name!r}",
                               path=self.checkpoint.folder, tensor=name) from None
        ck = self.checkpoint
        p = ck.params[param]
        if state == "model":
            if p.kind == "tied":
                return self.read(f"model/{p.tied_to}").clone()
            if p.kind in ("frozen", "buffer", "weight"):
                return ck.model_tensor(param)
            return ck.tensors(param, ("fp32",))["fp32"]
        value = ck.tensors(param, (state,))[state]
        if state == "step":
            return torch.as_tensor(value, dtype=torch.float32).clone()
        return value.to(torch.float32)

    def objects(self) -> dict[str, Any]:
        """`optim/param_groups` (with parameter names) and `deepspeed` metadata, as JSON."""
        ck = self.checkpoint
        meta = dict(ck.meta)
        groups = meta.pop("param_groups", None) or []
        members = self._group_members(len(groups))
        param_groups = [{**g, "params": members.get(i, [])} for i, g in enumerate(groups)]
        return {"optim": {"param_groups": param_groups}, "deepspeed": meta}

    def _group_members(self, num_groups: int) -> dict[int, list[str]]:
        """Parameter group -> parameter names. DeepSpeed's flat buffers (ZeRO-3: sub-groups)
        are the optimizer's params; param_groups[i]['params'] lists the buffers of group i."""
        ck = self.checkpoint
        if ck.zero_stage == 0 or not num_groups:
            return {}
        osd = ck.optimizer_file_state(0)
        raw = (osd["optimizer_state_dict"] if ck.zero_stage == 3 else osd["base_optimizer_state"])
        flat_to_group = {}
        if isinstance(raw, dict):
            for i, g in enumerate(raw.get("param_groups", [])):
                for flat in g.get("params", []):
                    flat_to_group[int(flat)] = i
        out: dict[int, list[str]] = {}
        for p in ck.params.values():
            if p.kind == "trainable" and p.group is not None:
                out.setdefault(flat_to_group.get(p.group, p.group), []).append(p.name)
        return out

    def close(self) -> None:
        """Drop the mapped files."""
        self.checkpoint.close()


def open_deepspeed_source(path: str, *, tag: str | None = None, trust_pickle: bool = False,
                          **_: Any) -> DeepSpeedSource:
    """Open a DeepSpeed save_dir (with `latest`) or tag folder as a logical source."""
    return DeepSpeedSource(path, tag=tag, trust_pickle=trust_pickle)
