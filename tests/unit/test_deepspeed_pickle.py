"""The DeepSpeed pickle allowlist: stand-ins in, DeepSpeed's class names out, nothing else."""

from __future__ import annotations

import fractions

import numpy as np
import pytest
import torch
from elastickit.checkpoint.errors import DataError
from elastickit.reshard.adapters.deepspeed_pickle import (
    DEEPSPEED_ALLOWLIST,
    FragmentAddress,
    LossScaler,
    ZeroStage,
    load_pt,
    save_pt,
    to_json,
)


def _sample() -> dict:
    scaler = LossScaler()
    scaler.__dict__.update(cur_scale=1.0, dynamic=False)
    addr = FragmentAddress()
    addr.__dict__.update(numel=7, start=3)
    return {"loss_scaler": scaler, "zero_stage": ZeroStage(2), "maps": [{"w": addr}],
            "flat": np.arange(5, dtype=np.float32)}


def test_allowlist_names_exactly_the_deepspeed_classes_seen():
    assert sorted(DEEPSPEED_ALLOWLIST) == [
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    ]


def test_round_trip_keeps_stand_ins_and_writes_deepspeed_names(tmp_path):
    path = str(tmp_path / "optim.pt")
    save_pt(_sample(), path)
    with open(path, "rb") as f:
        raw = f.read()
    assert b"deepspeed.runtime.fp16.loss_scaler\nLossScaler" in raw
    assert b"deepspeed.runtime.zero.config\nZeroStageEnum" in raw
    assert b"elastickit" not in raw
    back = load_pt(path)
    assert isinstance(back["loss_scaler"], LossScaler) and back["loss_scaler"].cur_scale == 1.0
    assert isinstance(back["zero_stage"], ZeroStage) and back["zero_stage"] == 2
    assert (back["maps"][0]["w"].start, back["maps"][0]["w"].numel) == (3, 7)
    assert back["flat"].dtype == np.float32 and back["flat"].tolist() == [0, 1, 2, 3, 4]
    assert to_json(back["loss_scaler"]) == {
        "__class__": "deepspeed.runtime.fp16.loss_scaler.LossScaler", "cur_scale": 1.0, "dynamic": False}
    assert to_json(back["zero_stage"]) == 2


def test_class_outside_allowlist_fails_naming_file_and_class(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"x": fractions.Fraction(1, 3)}, path)
    with pytest.raises(DataError) as e:
        load_pt(path)
    msg = str(e.value)
    assert path in msg and "fractions.Fraction" in msg and "--trust-pickle" in msg
    assert e.value.path == path
    assert load_pt(path, trust_pickle=True)["x"] == fractions.Fraction(1, 3)


def test_missing_and_garbage_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pt(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable torch checkpoint"):
        load_pt(str(bad))
