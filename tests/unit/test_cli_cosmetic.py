"""Small things a new user notices (issue 13 item 21): `--debug` anywhere, flags without a
`<bool>` label, flags (not classes) named in errors, an empty `--to`, `reshard --json`,
"1 rank"."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from elastickit.checkpoint.errors import RequestError
from elastickit.reshard.layout import ParallelLayout
from elastickit.virtual import save_virtual
from typer.testing import CliRunner

from elastickit.cli.main import app, global_flags
from elastickit.trainer.launch import TrainRequest

pytestmark = pytest.mark.timeout(60)


def test_debug_after_the_subcommand(tmp_path):
    assert global_flags(["inspect", "x", "--debug"]) == ["--debug", "inspect", "x"]
    assert global_flags(["train", "--", "--debug"]) == ["train", "--", "--debug"]
    r = subprocess.run(
        [sys.executable, "-m", "elastickit.cli.main", "inspect", str(tmp_path / "nope"), "--debug"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert r.returncode == 2 and "Traceback" in r.stderr and "does not exist" in r.stderr


def test_flags_have_no_type_label_in_help():
    res = CliRunner().invoke(app, ["reshard", "--help"])
    assert res.exit_code == 0 and "--dry-run" in res.output
    assert "<bool>" not in res.output


@pytest.fixture()
def ck(tmp_path):
    save_virtual(str(tmp_path / "c1"), 2, ParallelLayout(), [{"model/w": torch.ones(4, 2)}])
    return str(tmp_path / "c1")


@pytest.mark.parametrize(
    "to, message",
    [
        ("", "--to: layout '' names no axis; give one such as tp=2 or dp=4"),
        ("tp=0", "--to: layout axis 'tp' must be at least 1, got 0 in 'tp=0'"),
        ("dp=2,zero=7", "--to: zero must be 0, 1, 2 or 3, got 7 in 'dp=2,zero=7'"),
    ],
)
def test_reshard_to_names_the_flag(ck, to, message):
    res = CliRunner().invoke(app, ["reshard", ck, "--to", to, "--dry-run"])
    assert res.exit_code == 2 and res.output == f"error: {message}\n"


def test_train_layout_errors_name_the_flag_and_count_ranks():
    with pytest.raises(RequestError) as e:
        TrainRequest(layout="tp=0").resolved_layout()
    assert str(e.value) == "--layout 'tp=0': tp=0: an axis needs at least 1 rank (write tp=1 or leave it out)"
    with pytest.raises(RequestError) as e:
        TrainRequest(layout="single", nproc=2).resolved_nproc()
    assert str(e.value) == (
        "--nproc 2 does not match --layout single (1 rank); pass --nproc 1 or change the layout"
    )


def test_reshard_json_without_dry_run_prints_json(ck, tmp_path):
    res = CliRunner().invoke(app, ["reshard", ck, str(tmp_path / "d"), "--to", "dp=2", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["checkpoint"] == str(tmp_path / "d" / "step-00000002") and got["step"] == 2
    assert got["target"] == "dp=2" and got["world_size"] == 2 and got["files"] == ["rank-00000.safetensors"]
