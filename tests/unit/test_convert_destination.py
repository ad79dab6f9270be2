"""Where `convert` and `reshard` write (issue 13, items 4 and 7): a new checkpoint root outside
the source, committed at once, that a job resumes from."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import elastickit as ek
from elastickit.cli.main import app

pytestmark = pytest.mark.timeout(120)


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def _train(root, steps=(2, 4)):
    m, o = _model()
    with ek.Checkpointer(str(root)) as ck:
        for s in range(1, max(steps) + 1):
            o.zero_grad()
            m(torch.ones(2, 4)).pow(2).mean().backward()
            o.step()
            if s in steps:
                ck.save(s, {"model": m, "optim": o}).durable.result()
    return m


def _digest(path) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture()
def c1(tmp_path):
    _train(tmp_path / "c1")
    return tmp_path / "c1"


def test_convert_into_its_own_source_is_refused_and_the_source_untouched(c1, tmp_path):
    before = _digest(c1)
    res = _run("convert", c1, c1)
    assert res.exit_code == 2
    assert f"error: {c1} is the source {c1} itself; write to a new directory" in res.output
    os.symlink(c1, tmp_path / "link")
    res = _run("convert", c1, tmp_path / "link")
    assert res.exit_code == 2 and "is the source" in res.output
    res = _run("convert", c1, c1 / "sub")
    assert res.exit_code == 2
    assert f"{c1 / 'sub'} lies inside the source {c1}; write to a new directory outside it" in res.output
    res = _run("convert", c1 / "step-00000002", c1 / "step-00000010")
    assert res.exit_code == 2
    assert f"lies in the run root {c1} of the source" in res.output
    res = _run("convert", tmp_path / "link", tmp_path / "link" / "x", "--to", "dcp")
    assert res.exit_code == 2 and "lies inside the source" in res.output
    res = _run("reshard", c1, c1, "--to", "dp=2")
    assert res.exit_code == 2 and "is the source" in res.output
    res = _run("reshard", c1 / "step-00000004", c1 / "r", "--to", "dp=2")
    assert res.exit_code == 2 and "lies in the run root" in res.output
    assert _digest(c1) == before


def test_convert_refuses_a_non_empty_target_like_dcp_and_safetensors(c1, tmp_path):
    other = tmp_path / "other"
    _train(other, steps=(6,))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for to in ("elastickit", "dcp", "safetensors"):
        for dst in (other, junk):
            before = _digest(dst)
            res = _run("convert", c1, dst, "--to", to)
            assert res.exit_code == 2, (to, dst, res.output)
            assert f"{dst} exists and is not empty; choose a new destination" in res.output
            assert _digest(dst) == before
        res = _run("convert", c1, afile, "--to", to)
        assert res.exit_code == 2
        assert f"{afile} exists and is not a directory; choose a new destination" in res.output
    res = _run("reshard", c1, afile, "--to", "dp=2")  # was FileExistsError (internal error)
    assert res.exit_code == 2
    assert f"error: {afile} exists and is not a directory; choose a new destination" in res.output
    res = _run("reshard", c1, other, "--to", "dp=2")
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    # an empty directory (or a link to one) is a new destination
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "empty", tmp_path / "to-empty")
    assert _run("convert", c1, tmp_path / "to-empty").exit_code == 0
    assert os.listdir(tmp_path / "empty") == ["step-00000004"]


def _restore(root):
    m, o = _model()
    with ek.Checkpointer(str(root)) as ck:
        step = ck.restore({"model": m, "optim": o})
    return step, m


def test_reshard_and_convert_both_write_a_root_that_training_resumes_from(c1, tmp_path):
    want = _train(tmp_path / "ref")
    # a root or a step directory as SRC; DST is a new root holding the source's step
    for args, dst, step in [
        (("reshard", c1, tmp_path / "r1", "--to", "dp=2"), tmp_path / "r1", 4),
        (("reshard", c1 / "step-00000002", tmp_path / "r2", "--to", "dp=2"), tmp_path / "r2", 2),
        (("convert", c1, tmp_path / "v1"), tmp_path / "v1", 4),
        (("convert", c1 / "step-00000002", tmp_path / "v2"), tmp_path / "v2", 2),
        (("reshard", tmp_path / "v1", tmp_path / "r3", "--to", "dp=3"), tmp_path / "r3", 4),
    ]:
        res = _run(*args)
        assert res.exit_code == 0, res.output
        assert os.listdir(dst) == [f"step-{step:08d}"], args
        assert f"resume with --ckpt {dst}" in res.output
        got_step, m = _restore(dst)
        assert got_step == step, args
        if step == 4:
            for k, v in want.state_dict().items():
                assert torch.equal(m.state_dict()[k], v), (args, k)


_CRASH = r"""
import os, signal, sys
from elastickit.checkpoint.format import integrity
import safetensors.torch as st
calls = {"n": 0}
real_save = st.save_file
def save_then_die(*a, **k):
    real_save(*a, **k)
    calls["n"] += 1
    if calls["n"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
st.save_file = save_then_die
real_commit = integrity.atomic_write
def die_before_commit(path, *a, **k):
    if path.endswith("manifest.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_commit(path, *a, **k)
integrity.atomic_write = die_before_commit
from elastickit.cli.main import app
app(sys.argv[1:])
"""


@pytest.mark.parametrize("to", ["safetensors", "elastickit"])
def test_a_crash_mid_convert_leaves_no_destination(c1, tmp_path, to):
    dst = tmp_path / "out"
    args = ["convert", str(c1), str(dst), "--to", to, "--max-shard-size", "100B"]
    r = subprocess.run([sys.executable, "-c", _CRASH, *args], capture_output=True, text=True, timeout=100, check=False)
    assert r.returncode == -9, r.stderr  # killed mid-write
    assert not dst.exists()  # nothing under the destination's name, committed or not
    assert any(n.startswith(".out.partial-") for n in os.listdir(tmp_path))
    res = _run(*args)  # the next run is not blocked, and removes the dead run's partial output
    assert res.exit_code == 0, res.output
    assert not any(n.startswith(".out.partial-") for n in os.listdir(tmp_path))


def test_deepspeed_universal_goes_next_to_its_tag_not_into_it(tmp_path):
    from tests.unit.test_deepspeed_layout import _zero3

    tag = tmp_path / "ds" / "global_step7"
    tag.mkdir(parents=True)
    _zero3(tag)
    (tmp_path / "ds" / "latest").write_text("global_step7")
    res = _run("convert", tmp_path / "ds", tag / "u", "--to", "deepspeed-universal")
    assert res.exit_code == 2 and f"{tag / 'u'} lies inside the source {tag}" in res.output
    # DeepSpeed's own layout: the universal folder beside the tag, in the save_dir
    res = _run("convert", tmp_path / "ds", tmp_path / "ds" / "global_step7_universal", "--to", "deepspeed-universal")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ds" / "latest_universal").read_text().strip() == "global_step7_universal"


def test_deepspeed_universal_export_is_durable_before_its_marker(tmp_path, monkeypatch):
    # Every file and folder of the export reaches the disk (fsync) before `latest_universal`
    # names it: a crash at any instant leaves the marker naming a whole checkpoint.
    from elastickit.reshard.adapters.deepspeed import DeepSpeedCheckpoint
    from elastickit.reshard.adapters.deepspeed_universal import write_universal

    from tests.unit.test_deepspeed_layout import _zero3

    tag = tmp_path / "ds" / "global_step7"
    tag.mkdir(parents=True)
    _zero3(tag)
    (tmp_path / "ds" / "latest").write_text("global_step7")
    synced: list[str] = []
    marker_at: list[int] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        if os.path.basename(dst) == "latest_universal":
            marker_at.append(len(synced))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "ds" / "global_step7_universal"
    with DeepSpeedCheckpoint(str(tmp_path / "ds")) as ck:
        write_universal(ck, str(out))
    assert (tmp_path / "ds" / "latest_universal").read_text() == "global_step7_universal"
    assert len(marker_at) == 1
    before = set(synced[: marker_at[0]])
    tree = {os.path.realpath(os.path.join(d, n)) for d, ds, fs in os.walk(out) for n in [*fs, *ds]}
    assert tree and tree | {os.path.realpath(out), os.path.realpath(tmp_path / "ds")} <= before
