"""Bad input to reshard / convert gets one sentence and exit 2 (or 1 for bad data), never a raw
Python error (issue 13 item 13)."""

from __future__ import annotations

import pytest
import torch
from elastickit.reshard.layout import ParallelLayout
from elastickit.virtual import save_virtual
from typer.testing import CliRunner

from elastickit.cli.main import app

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def ck(tmp_path):
    save_virtual(
        str(tmp_path / "c1"), 2, ParallelLayout(), [{"model/w": torch.ones(32, 16), "model/b": torch.ones(16)}]
    )
    return tmp_path / "c1"


def _run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "internal error" not in res.output and "Traceback" not in res.output, res.output
    return res


def _rules(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


SHARD = '[[rule]]\nmatch = "model/w"\nops = [{{op = "shard", dim = {dim}, axis = "tp"}}]\n'


@pytest.mark.parametrize(
    "text, message",
    [
        (
            SHARD.format(dim=5),
            (
                "rule 'model/w' does not fit tensor 'model/w': shard.dim is 5 but the tensor "
                "has 2 dim(s) (shape [32, 16]); use a dim from 0 to 1"
            ),
        ),
        (
            '[[rule]]\nmatch = "model/w"\nops = [{op = "pad", dim = 3, size = 30}]\n',
            (
                "rule 'model/w' does not fit tensor 'model/w': pad.dim is 3 but the tensor has "
                "2 dim(s) (shape [32, 16]); use a dim from 0 to 1"
            ),
        ),
        ('[[rule]]\nmatch = 5\n', "{p}: rule 0: 'match' must be a name pattern or a list of them, got 5"),
        ("rule = 5\n", "{p}: the rules must be a list of [[rule]] tables, got 5"),
        (
            '[[rule]]\nmatch = "model/w"\nops = [{op = "rename", src = "w", dst = "{zz}"}]\n',
            (
                "{p}: rule 0 (model/w) is malformed: rename.dst '{{zz}}' uses {{zz}}, which is "
                "not a named group (?P<zz>...) of rename.src 'w'"
            ),
        ),
        ('[[rule]]\nmatch = "model/w"\nops = 3\n', "{p}: rule 0 (model/w): 'ops' must be a list of tables"),
    ],
)
def test_bad_rules_are_one_sentence(ck, tmp_path, text, message):
    p = _rules(tmp_path, text)
    res = _run("reshard", ck, "--to", "tp=2", "--dry-run", "--rules", p)
    assert res.exit_code == 2
    assert res.output == f"error: {message.format(p=p)}\n"


def test_a_rules_path_that_is_a_folder(ck, tmp_path):
    res = _run("reshard", ck, "--to", "tp=2", "--dry-run", "--rules", tmp_path)
    assert res.exit_code == 2
    assert res.output == (
        f"error: rules file {tmp_path} cannot be read (Is a directory); pass a TOML file to --rules\n"
    )


def test_reshard_into_a_file(ck, tmp_path):
    (tmp_path / "afile").write_text("x")
    res = _run("reshard", ck, tmp_path / "afile", "--to", "tp=2")
    assert res.exit_code == 2
    assert res.output == f"error: {tmp_path / 'afile'} exists and is not a directory; choose a new destination\n"


def test_convert_size_and_unreadable_safetensors(ck, tmp_path):
    res = _run("convert", ck, tmp_path / "o", "--to", "safetensors", "--max-shard-size", "inf")
    assert res.exit_code == 2
    assert res.output == "error: --max-shard-size 'inf' is not a size such as 500MB or 5GB\n"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"garbage!" * 4)
    res = _run("convert", tmp_path / "hf", tmp_path / "o")
    assert res.exit_code == 1
    assert res.output.startswith(
        f"error: {tmp_path / 'hf' / 'model.safetensors'} is not a readable safetensors file ("
    )
    assert not (tmp_path / "o").exists()


def test_inspect_negative_tensor_count(ck):
    res = _run("inspect", ck, "--tensors", "-5")
    assert res.exit_code == 2
    assert res.output == "error: --tensors -5: give how many tensors to list, or 0 for all\n"
