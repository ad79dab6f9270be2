"""elastickit's DeepSpeed engine: DeepSpeed state dicts <-> tensors + JSON, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from elastickit.checkpoint.errors import DataError, RequestError

from elastickit.integrations.deepspeed_engine import decode, encode

ds = pytest.importorskip("deepspeed")

pytestmark = pytest.mark.deepspeed


def test_round_trip_keeps_deepspeed_objects_and_structure():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    sd = {"loss_scaler": LossScaler(scale=2.0), "zero_stage": ZeroStageEnum.gradients,
          "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0)}},
          "shape": torch.Size([2, 3]), "betas": (0.9, 0.999), "maps": [{"w": fragment_address(numel=5, start=1)}]}
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode(sd, "f", tensors)
    assert sorted(tensors) == ["f/state/0/exp_avg", "f/state/0/step"]
    back = decode(json.loads(json.dumps(skeleton)), tensors)
    assert isinstance(back["loss_scaler"], LossScaler) and back["loss_scaler"].cur_scale == 2.0
    assert back["zero_stage"] is ZeroStageEnum.gradients
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], torch.arange(4.0))
    assert back["shape"] == torch.Size([2, 3]) and back["betas"] == (0.9, 0.999)
    assert back["maps"][0]["w"] == fragment_address(numel=5, start=1)


def test_unknown_objects_are_refused_both_ways():
    with pytest.raises(RequestError, match="cannot store without pickle"):
        encode({"x": object()}, "f", {})
    with pytest.raises(DataError, match="not on the DeepSpeed allowlist"):
        decode({"__obj__": "os.system", "state": {"__dict__": []}}, {})


def test_plain_deepspeed_files_load_with_real_classes_and_weights_only(tmp_path):
    import fractions

    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from elastickit.integrations.deepspeed_engine import ElastickitCheckpointEngine

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"loss_scaler": LossScaler(scale=4.0), "t": torch.ones(2)}, good)
    torch.save({"x": fractions.Fraction(1, 3)}, bad)
    engine = ElastickitCheckpointEngine(engine=None)
    back = engine.load(str(good))
    assert isinstance(back["loss_scaler"], LossScaler) and back["loss_scaler"].cur_scale == 4.0
    with pytest.raises(DataError, match="weights_only=True"):
        engine.load(str(bad))
