"""The flat(zero) rule on synthetic DeepSpeed checkpoints (3 ranks, padding), without DeepSpeed."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from elastickit.checkpoint.errors import DataError
from elastickit.reshard.adapters.deepspeed import open_deepspeed
from elastickit.reshard.adapters.deepspeed_pickle import (
    FragmentAddress,
    LossScaler,
    ZeroStage,
)
from elastickit.reshard.adapters.deepspeed_pickle import save_pt as _save_pt
from elastickit.reshard.adapters.ptfile import Size

SHAPES = OrderedDict(a=(5,), b=(2, 3), c=(4,))
WORLD = 3


def _numpy(value):
    """The tree with torch tensors as numpy arrays and torch.Size as ptfile.Size (what save_pt takes)."""
    if isinstance(value, torch.Size):
        return Size(value)
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return type(value)((k, _numpy(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_numpy(v) for v in value]
    return value


def save_pt(obj, path):
    _save_pt(_numpy(obj), path)


def _truth() -> dict[str, torch.Tensor]:
    out, start = {}, 0.0
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        out[name] = torch.arange(start, start + n).view(shape)
        start += 100
    return out


def _model_states(module: dict, **extra) -> dict:
    return {"module": module, "buffer_names": ["buf"], "optimizer": None,
            "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in SHAPES.items())],
            "shared_params": {}, "lr_scheduler": {"last_batch_iteration": 6}, "global_steps": 7,
            "dp_world_size": WORLD, "mp_world_size": 1, "ds_version": "0.19.8", "my_epoch": 2, **extra}


def _zero2(folder, corrupt_mapping: bool = False) -> dict[str, torch.Tensor]:
    """ZeRO-2: a | pad(1) | b | c = 16, aligned to 18, partition 6; last rank's fp32 unpadded."""
    truth = _truth()
    align = [1, 0, 0]
    pieces, offsets, off = [], {}, 0
    for (name, t), pad in zip(truth.items(), align):
        offsets[name] = off
        pieces += [t.reshape(-1), torch.full((pad,), -1.0)]
        off += t.numel() + pad
    flat = torch.cat(pieces + [torch.full((18 - off,), -2.0)])
    part = 6
    module = {**{n: t.clone() for n, t in truth.items()}, "buf": torch.ones(2)}
    save_pt(_model_states(module), str(folder / "mp_rank_00_model_states.pt"))
    for r in range(WORLD):
        pad = 18 - off if r == WORLD - 1 else 0
        fp32 = flat[r * part:(r + 1) * part - pad].clone()
        mapping = OrderedDict()
        for name, t in truth.items():
            lo, hi = max(offsets[name], r * part), min(offsets[name] + t.numel(), (r + 1) * part)
            if lo < hi:
                addr = FragmentAddress()
                addr.__dict__.update(numel=hi - lo, start=lo - r * part + (1 if corrupt_mapping else 0))
                mapping[name] = addr
        scaler = LossScaler()
        scaler.__dict__.update(cur_scale=1.0, dynamic=False)
        osd = {"loss_scaler": scaler, "zero_stage": ZeroStage(2),
               "base_optimizer_state": {"state": {0: {"step": torch.tensor(7.0),
                                                      "exp_avg": flat[r * part:(r + 1) * part] * 10,
                                                      "exp_avg_sq": flat[r * part:(r + 1) * part] * 20}},
                                        "param_groups": [{"lr": 0.1, "params": [0]}]},
               "single_partition_of_fp32_groups": [fp32], "group_paddings": [pad],
               "param_alignment_paddings": [align], "partition_count": [WORLD],
               "param_slice_mappings": [mapping]}
        save_pt({"optimizer_state_dict": osd}, str(folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    return truth


def _zero3(folder) -> dict[str, torch.Tensor]:
    """ZeRO-3: each parameter split alone into ceil(numel / 3) pieces, padded."""
    truth = _truth()
    for r in range(WORLD):
        chunks = []
        for t in truth.values():
            part = math.ceil(t.numel() / WORLD)
            padded = torch.cat([t.reshape(-1), torch.full((part * WORLD - t.numel(),), -1.0)])
            chunks.append(padded[r * part:(r + 1) * part])
        flat = torch.cat(chunks)
        module = {**{n: torch.empty(0) for n in truth}, "buf": torch.ones(2)}
        save_pt(_model_states(module), str(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))
        osd = {"zero_stage": ZeroStage(3), "partition_count": WORLD,
               "optimizer_state_dict": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": flat * 10,
                                                      "exp_avg_sq": flat * 20}},
                                        "param_groups": [{"lr": 0.1, "params": [0]}]},
               "fp32_flat_groups": [flat]}
        save_pt({"optimizer_state_dict": osd}, str(folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    return truth


@pytest.mark.parametrize("build,stage", [(_zero2, 2), (_zero3, 3)])
def test_fragments_rebuild_every_parameter_and_state(tmp_path, build, stage):
    tag = tmp_path / "global_step7"
    tag.mkdir()
    truth = build(tag)
    (tmp_path / "latest").write_text("global_step7")
    with open_deepspeed(str(tmp_path)) as ck:
        assert (ck.zero_stage, ck.dp_world_size, ck.tag) == (stage, WORLD, "global_step7")
        assert [p.kind for p in ck.params.values()] == ["trainable"] * 3 + ["buffer"]
        for name, t in truth.items():
            got = ck.tensors(name)
            assert torch.equal(got["fp32"], t), name
            assert torch.equal(got["exp_avg"], t * 10) and torch.equal(got["exp_avg_sq"], t * 20)
            assert float(got["step"]) == 7.0
        assert ck.meta["global_steps"] == 7 and ck.meta["client_state"] == {"my_epoch": 2}
        assert ck.meta["lr_scheduler"] == {"last_batch_iteration": 6}
        assert torch.equal(ck.fp32_state_dict()["buf"], torch.ones(2))


def test_b_spans_two_ranks_in_zero2(tmp_path):
    _zero2(tmp_path)
    with open_deepspeed(str(tmp_path)) as ck:
        frags = ck.params["b"].fragments
    # a (5) + pad (1) puts b at 6..12: exactly rank 1's partition [6, 12).
    assert [(f.rank, f.src_offset, f.dst_offset, f.numel) for f in frags] == [(1, 0, 0, 6)]
    assert [(f.rank, f.src_offset, f.numel) for f in ck.params["c"].fragments] == [(2, 0, 4)]


def test_disagreeing_slice_mappings_are_refused(tmp_path):
    _zero2(tmp_path, corrupt_mapping=True)
    with pytest.raises(DataError, match="param_slice_mappings puts a"):
        open_deepspeed(str(tmp_path))


def test_missing_rank_file_is_refused(tmp_path):
    _zero2(tmp_path)
    (tmp_path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DataError, match="lacks optimizer files"):
        open_deepspeed(str(tmp_path))


def test_logical_source_names_values_and_groups(tmp_path):
    from elastickit.reshard.adapters.deepspeed_source import DeepSpeedSource

    truth = _zero3(tmp_path)
    src = DeepSpeedSource(str(tmp_path))
    try:
        names = src.tensors()
        assert "model/b" in names and names["model/b"].shape == (2, 3) and names["model/b"].dtype == "F32"
        assert "optim/state/c/exp_avg_sq" in names and names["optim/state/c/step"].shape == ()
        assert "optim/state/buf/exp_avg" not in names
        assert torch.equal(src.read("model/b"), truth["b"])
        assert torch.equal(src.read("optim/state/a/exp_avg"), truth["a"] * 10)
        assert float(src.read("optim/state/a/step")) == 7.0
        objects = src.objects()
        assert objects["optim"]["param_groups"] == [{"lr": 0.1, "params": ["a", "b", "c"]}]
        assert objects["deepspeed"]["zero_stage"] == 3 and src.step == 7
    finally:
        src.close()


def test_pure_layouts_span_ranks_and_pad():
    from elastickit.reshard.adapters.deepspeed_layout import zero3_layout, zero12_layout

    # ZeRO-2, world 4, partition 3: x (2) | pad 1 | y (8) spans ranks 1, 2 and 3.
    params = zero12_layout([{"x": (2,), "y": (2, 4)}], [3], 4, [[1, 0]])
    assert [(f.rank, f.src_offset, f.dst_offset, f.numel) for f in params["y"].fragments] == [
        (1, 0, 0, 3), (2, 0, 3, 3), (3, 0, 6, 2)]
    with pytest.raises(ValueError, match="parameter y runs past"):
        zero12_layout([{"x": (2,), "y": (2, 4)}], [2], 4, [[1, 0]])
    # ZeRO-3, world 4: 5 elements -> pieces of 2 (rank 3 holds only padding: no fragment).
    params, sizes = zero3_layout([{"a": (5,), "b": (1,)}], 4)
    assert [(f.rank, f.src_offset, f.dst_offset, f.numel) for f in params["a"].fragments] == [
        (0, 0, 0, 2), (1, 0, 2, 2), (2, 0, 4, 1)]
    assert [(f.rank, f.src_offset, f.numel) for f in params["b"].fragments] == [(0, 2, 1)]
    assert sizes == [3]
