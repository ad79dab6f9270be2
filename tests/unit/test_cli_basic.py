"""inspect / verify / ls / --version through the real console script."""

import json
import subprocess
import sys
import pathlib

import pytest
import torch

import elastickit as ek

EK = [sys.executable, "-m", "elastickit.cli.main"]


def _run(*args):
    return subprocess.run([*EK, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    ck = ek.Checkpointer(str(d))
    ck.save(1, {"model": m, "extra": {"epoch": 1}}).durable.result()
    ck.save(2, {"model": m, "extra": {"epoch": 1}})
    ck.close()
    return d


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"elastickit {ek.__version__}"


def test_inspect_json(root):
    r = _run("inspect", str(root), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["step"] == 2 and info["num_tensors"] == 2
    assert {t["name"] for t in info["tensors"]} == {"model/weight", "model/bias"}


def test_inspect_text(root):
    r = _run("inspect", str(root / "step-00000001"))
    assert r.returncode == 0 and "step 1" in r.stdout and "model/weight" in r.stdout


def test_ls(root):
    r = _run("ls", str(root), "--json")
    rows = json.loads(r.stdout)
    assert [(x["step"], x["status"]) for x in rows] == [(1, "complete"), (2, "complete")]


def test_verify_ok_and_corrupt(tmp_path):
    m = torch.nn.Linear(4, 3)
    with ek.Checkpointer(str(tmp_path)) as ck:
        ck.save(1, {"model": m})
    assert _run("verify", str(tmp_path)).returncode == 0
    f = tmp_path / "step-00000001" / "rank-00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-2] ^= 0x01
    f.write_bytes(bytes(raw))
    r = _run("verify", str(tmp_path))
    assert r.returncode == 1
    assert "rank-00000.safetensors" in r.stderr and "model/" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_path_is_a_bad_request_without_traceback(tmp_path):
    r = _run("inspect", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _run("--debug", "inspect", str(tmp_path / "nope"))
    assert "Traceback" in r.stderr


def test_incomplete_checkpoint_is_bad_data(tmp_path):
    (tmp_path / "step-00000001").mkdir()
    r = _run("verify", str(tmp_path / "step-00000001"))
    assert r.returncode == 1 and "no manifest.json" in r.stderr
