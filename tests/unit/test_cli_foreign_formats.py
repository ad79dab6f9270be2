"""inspect / verify / ls / reshard on a DCP, safetensors or DeepSpeed folder name the format and
the conversion, exit 2 (issue 13 item 17; was "holds no committed checkpoint", exit 1)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from elastickit.cli.main import app

pytestmark = pytest.mark.timeout(60)


def _dcp(path):
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": {"w": torch.ones(2, 2)}}, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)


def _safetensors(path):
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"w": torch.ones(2, 2)}, str(path / "model.safetensors"))


def _deepspeed(path):
    (path / "global_step3").mkdir(parents=True)
    (path / "latest").write_text("global_step3")
    (path / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"")


@pytest.mark.parametrize(
    "make, fmt, name",
    [(_dcp, "dcp", "PyTorch DCP"), (_safetensors, "safetensors", "Hugging Face safetensors"),
     (_deepspeed, "deepspeed", "DeepSpeed")],
)
def test_foreign_checkpoints_name_their_format(tmp_path, make, fmt, name):
    src = tmp_path / "src"
    make(src)
    for args in (["inspect", src], ["verify", src], ["ls", src], ["reshard", src, "--to", "tp=2", "--dry-run"]):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 2, (args, res.output)
        assert res.output == (
            f"error: {src} is a {name} checkpoint, not an elastickit one; convert it first: "
            f"elastickit convert {src} DST --from {fmt}\n"
        ), args


def test_an_empty_folder_is_still_no_checkpoint(tmp_path):
    res = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 1 and "holds no committed checkpoint" in res.output


@pytest.mark.parametrize("wrong", ["elastickit", "deepspeed"])
def test_convert_from_the_wrong_format_names_the_right_one(tmp_path, wrong):
    src = tmp_path / "src"
    _dcp(src)
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--from", wrong])
    assert res.exit_code == 2, res.output
    assert res.output == f"error: {src} is a dcp checkpoint, not {wrong}; use --from dcp (or leave --from out)\n"
    assert not (tmp_path / "out").exists()
