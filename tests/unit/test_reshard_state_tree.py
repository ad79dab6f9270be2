"""Restoring across pipeline layouts: a module's or optimizer's own tree says where tensors go."""

from __future__ import annotations

import pytest
from elastickit.state import overlay_tree

pytestmark = pytest.mark.timeout(10)


def T(name: str) -> dict:
    return {"__tensor__": name}


STAGE0 = {  # what rank 0 (pipeline stage 0) saved
    "state": {"l0": {"exp_avg": T("o/l0/exp_avg"), "step": T("o/l0/step")}},
    "param_groups": [{"lr": 0.5, "betas": [0.9, 0.99], "params": ["l0"], "note": "kept"}],
}
WHOLE = {  # a whole model's optimizer (pp=1) as the target
    "state": {
        "l0": {"exp_avg": T("o/l0/exp_avg"), "step": T("o/l0/step")},
        "l1": {"exp_avg": T("o/l1/exp_avg"), "step": T("o/l1/step")},
    },
    "param_groups": [{"lr": 0.1, "betas": [0.8, 0.9], "params": ["l0", "l1"]}],
}


def test_whole_model_takes_every_stage_with_saved_hyperparameters():
    got = overlay_tree(STAGE0, WHOLE)
    assert got["state"] == WHOLE["state"]  # l1's tensors are tagged although rank 0 never saw l1
    assert got["param_groups"] == [
        {"lr": 0.5, "betas": [0.9, 0.99], "params": ["l0", "l1"], "note": "kept"}
    ]


def test_stage_takes_only_its_own_layers():
    stage1 = {
        "state": {"l1": WHOLE["state"]["l1"]},
        "param_groups": [{"lr": 0.1, "betas": [0.8, 0.9], "params": ["l1"]}],
    }
    got = overlay_tree(WHOLE, stage1)
    assert set(got["state"]) == {"l1"} and got["param_groups"][0]["params"] == ["l1"]
    assert got["param_groups"][0]["lr"] == 0.1  # the saved value (WHOLE is the saved tree here)
