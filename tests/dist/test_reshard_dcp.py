"""DCP interop: a DCP checkpoint of an FSDP2 + TP model (4 gloo ranks) converts to a consolidated
safetensors model equal to DCP's own `dcp_to_torch_save` output, and back to a DCP directory
that `torch.distributed.checkpoint.load` reads."""

from __future__ import annotations

import json
import os

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.timeout(200)]


def _save_dcp(rank: int, world_size: int, path: str) -> int:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from elastickit.trainer.model import model_config
    from elastickit.trainer.parallel import TrainLayout, build_mesh, parallelize

    layout = TrainLayout.parse("dp=2,tp=2")
    model = parallelize(
        model_config("tiny"), layout, build_mesh(layout, "cpu"), seed=3, device=torch.device("cpu")
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 250, (2, 8))).float().pow(2).mean().backward()
    optim.step()
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    dcp.save(sd, checkpoint_id=path)
    return sum(1 for v in sd["model"].values() if hasattr(v, "placements"))


def test_dcp_fsdp2_tp_to_safetensors_equals_dcp_to_torch_save(tmp_path) -> None:
    import torch
    from elastickit.reshard.convert import convert
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src = str(tmp_path / "dcp")
    assert run_ranks(_save_dcp, 4, args=(src,), timeout_s=150)[0] > 0  # DTensor state indeed
    ref_path = str(tmp_path / "ref.pt")
    dcp_to_torch_save(src, ref_path)
    ref = torch.load(ref_path, weights_only=True)["model"]

    report = convert(src, str(tmp_path / "hf"), target="safetensors", max_shard_bytes=64 * 1024)
    assert report.source_format == "dcp"
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref) and len(set(index["weight_map"].values())) > 1
    got = {}
    for f in sorted(set(index["weight_map"].values())):
        assert (
            os.path.getsize(tmp_path / "hf" / f) <= 64 * 1024 + 4096
        )  # a shard: the limit plus its header
        got.update(load_file(str(tmp_path / "hf" / f)))
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name

    # and back: elastickit -> DCP, read by DCP itself
    convert(src, str(tmp_path / "ek"), target="elastickit")
    convert(str(tmp_path / "ek"), str(tmp_path / "dcp2"), target="dcp")
    back = {"model": {k: torch.zeros_like(v) for k, v in ref.items()}}
    import torch.distributed.checkpoint as dcp

    dcp.load(back, checkpoint_id=str(tmp_path / "dcp2"), no_dist=True)
    for name, t in ref.items():
        assert torch.equal(back["model"][name], t), name
