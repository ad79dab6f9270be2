"""DCP conversions keep every entry exactly, on a checkpoint laid out as torchtitan 0.3.0 writes
one (written here by torch DCP with torchtitan's keys and value types): its model at the top
level, `optimizer` flattened by FQN (`state.<fqn>.exp_avg`, `param_groups.<fqn>.betas` as a
tuple), `lr_scheduler`, `dataloader` (each dp rank's state pickled into bytes, never unpickled
here) and `train_state` (the step). Through `convert --from dcp`, `reshard` and `convert --to dcp`
every entry comes back at its key with its value and type; the step is train_state's; the
safetensors export holds the model only.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from typer.testing import CliRunner

from elastickit.cli.main import app


def _titan_state() -> dict:
    g = torch.Generator().manual_seed(0)
    model = {
        "tok_embeddings.weight": torch.randn(16, 8, generator=g),
        "layers.0.attention.wq.weight": torch.randn(8, 8, generator=g),
        "norm.weight": torch.randn(8, generator=g),
        "output.weight": torch.randn(16, 8, generator=g),
    }
    optimizer: dict = {}
    for fqn, p in model.items():
        optimizer[f"state.{fqn}.exp_avg"] = torch.randn(p.shape, generator=g)
        optimizer[f"state.{fqn}.exp_avg_sq"] = torch.rand(p.shape, generator=g)
        optimizer[f"state.{fqn}.step"] = torch.tensor(4.0)
        group = {"lr": 8e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
                 "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                 "fused": None, "decoupled_weight_decay": True, "initial_lr": 8e-4}
        for k, v in group.items():
            optimizer[f"param_groups.{fqn}.{k}"] = v
    losses = io.BytesIO()
    torch.save([3.5, 3.25], losses)
    return {
        **model,
        "optimizer": optimizer,
        "lr_scheduler": {"last_epoch": 4},
        "dataloader": {"dp_rank_0": pickle.dumps({"sample": 8, "epoch": 0}),
                       "dp_rank_1": pickle.dumps({"sample": 8, "epoch": 0, "rank": 1}), "world_size": 2},
        # 0.3.0's trainer keeps {step, ntokens_seen}; earlier versions a BytesIO of losses too.
        "train_state": {"step": 4, "ntokens_seen": 1024, "global_avg_losses": losses},
    }


def _save(state: dict, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path), no_dist=True)


def _load_like(path: str, template: dict) -> dict:
    """What torchtitan's own load gets: DCP loads into a state dict of its structure."""
    def blank(v):
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        if isinstance(v, dict):
            return {k: blank(x) for k, x in v.items()}
        return None
    sd = blank(template)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=path, no_dist=True)
    return sd


def _same(a, b, what=""):
    assert type(a) is type(b), f"{what}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), f"{what}: {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{what}/{k}")
    elif isinstance(a, io.BytesIO):
        assert a.getvalue() == b.getvalue(), what
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def _keys(path: str) -> set[str]:
    from elastickit.reshard.adapters.dcp import read_metadata

    return set(read_metadata(path).state_dict_metadata)


def _run(*args: str):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


def test_torchtitan_checkpoint_through_elastickit_and_back_is_exact(tmp_path):
    src, ek, re, back = (str(tmp_path / n) for n in ("titan", "ek", "re", "back"))
    state = _titan_state()
    _save(state, src)
    _run("convert", src, ek, "--from", "dcp")
    with open(os.path.join(ek, "step-00000004", "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["step"] == 4  # train_state.step, where torchtitan keeps it
    _run("reshard", ek, re, "--to", "dp=2")
    _run("convert", re, back, "--to", "dcp")
    # Every key torchtitan wrote is there again (and only elastickit's own step entry besides).
    assert _keys(back) - _keys(src) == {"elastickit.step"}
    assert _keys(src) <= _keys(back)
    got = _load_like(back, state)
    _same(state, got, "state")
    assert type(got["optimizer"]["param_groups.norm.weight.betas"]) is tuple
    assert pickle.loads(got["dataloader"]["dp_rank_1"]) == {"sample": 8, "epoch": 0, "rank": 1}


def test_safetensors_of_a_torchtitan_checkpoint_holds_the_model_only(tmp_path):
    from safetensors.torch import load_file

    src, out = str(tmp_path / "titan"), str(tmp_path / "st")
    state = _titan_state()
    _save(state, src)
    res = _run("convert", src, out, "--from", "dcp", "--to", "safetensors")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(index["weight_map"]) == sorted(k for k, v in state.items() if isinstance(v, torch.Tensor))
    for f in set(index["weight_map"].values()):
        for k, t in load_file(os.path.join(out, f)).items():
            assert torch.equal(t, state[k])
    assert "optimizer" in res.output  # it says what it left out


def test_an_entry_that_cannot_be_read_safely_stops_the_conversion(tmp_path):
    import datetime

    src = str(tmp_path / "titan")
    _save({"w": torch.ones(2), "extra": {"when": datetime.date(2026, 1, 1)}}, src)
    res = CliRunner().invoke(app, ["convert", src, str(tmp_path / "ek"), "--from", "dcp"])
    assert res.exit_code == 1
    assert "extra/when" in res.output  # named, not dropped


def test_checkpointer_keeps_tuples_bytes_and_bytesio(tmp_path):
    import elastickit as ek

    class Loader:
        def __init__(self, v):
            self.v = v

        def state_dict(self):
            return self.v

        def load_state_dict(self, d):
            self.v = d

    buf = io.BytesIO(b"\x00losses\xff")
    saved = {"dp_rank_0": pickle.dumps([1, 2]), "pair": (1, (2.5, "x")), "losses": buf, "n": [1, 2]}
    with ek.Checkpointer(str(tmp_path)) as ck:
        ck.save(1, {"data": Loader(saved)}, force=True)
    fresh = Loader(None)
    with ek.Checkpointer(str(tmp_path)) as ck:
        assert ck.restore({"data": fresh}) == 1
    _same(saved, fresh.v, "data")


def test_a_dict_that_looks_like_a_tag_is_refused(tmp_path):
    from elastickit.checkpoint.errors import RequestError

    import elastickit as ek

    with ek.Checkpointer(str(tmp_path)) as ck, pytest.raises(RequestError, match="__tuple__"):
        ck.save(1, {"x": {"__tuple__": [1, 2]}}, force=True)
