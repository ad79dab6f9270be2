"""The demo keeps its run directory where a user finds it (runs/demo by default), replaces only a
previous demo run there, and ends by naming the commands that show it."""

from __future__ import annotations

import os

import pytest
from elastickit.checkpoint.errors import RequestError
from typer.testing import CliRunner

from elastickit.cli.demo_cmd import look_lines
from elastickit.cli.main import app
from elastickit.demo import DEMO_MARK, DEMO_RUN, prepare_run_dir


def test_a_new_run_directory_is_made_and_marked(tmp_path) -> None:
    path = prepare_run_dir(str(tmp_path / "runs" / "demo"))
    assert path == str(tmp_path / "runs" / "demo")
    assert sorted(os.listdir(path)) == [DEMO_MARK]
    assert DEMO_RUN == os.path.join("runs", "demo")


def test_a_previous_demo_run_is_replaced_whole(tmp_path) -> None:
    path = prepare_run_dir(str(tmp_path / "demo"))
    os.makedirs(os.path.join(path, "ckpt", "step-00000005"))
    with open(os.path.join(path, "steps.jsonl"), "w") as f:
        f.write('{"step": 1}\n')
    assert prepare_run_dir(path) == path
    # Nothing of the old run is left to be appended to or resumed from.
    assert sorted(os.listdir(path)) == [DEMO_MARK]


def test_a_directory_that_is_not_a_demo_run_is_refused_and_left_alone(tmp_path) -> None:
    mine = tmp_path / "demo"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(RequestError, match=r"holds files that are not an elastickit demo run .*--workdir"):
        prepare_run_dir(str(mine))
    assert (mine / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RequestError, match="is a file"):
        prepare_run_dir(str(tmp_path / "afile"))


def test_the_cli_refuses_before_training_in_one_sentence(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "data.bin").write_bytes(b"\0")
    res = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path)])
    assert res.exit_code == 2
    assert "holds files that are not an elastickit demo run" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "run" / "data.bin").exists()


def test_the_last_lines_name_the_run_and_the_commands_that_show_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    run = prepare_run_dir(DEMO_RUN)
    lines = look_lines(run)
    assert "the run is kept in runs/demo" in lines[0]
    commands = [line.split("#")[0].split() for line in lines[1:]]
    assert [c[1:] for c in commands] == [["dashboard", "runs/demo"], ["top", "runs/demo"], ["ls", "runs/demo"]]
    # Outside the working directory the path is absolute, quoted when it needs it.
    other = prepare_run_dir(str(tmp_path / "a run"))
    assert f"top '{other}'" in look_lines(other)[2]


def test_after_scripts_demo_the_commands_name_the_venvs_executable(tmp_path, monkeypatch) -> None:
    """scripts/demo runs .venv/bin/elastickit with .venv/bin first on PATH; the caller's shell
    does not have it there, so the printed commands must name it."""
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    exe = tmp_path / ".venv" / "bin" / "elastickit"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", [str(exe), "demo"])
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}/usr/bin")
    monkeypatch.setenv("EK_CALLER_PATH", "/usr/bin")
    run = prepare_run_dir(DEMO_RUN)
    assert look_lines(run)[1].split()[:3] == [".venv/bin/elastickit", "dashboard", "runs/demo"]
    # Started from the caller's PATH itself: the plain name.
    monkeypatch.setenv("EK_CALLER_PATH", f"{exe.parent}{os.pathsep}/usr/bin")
    assert look_lines(run)[1].split()[:3] == ["elastickit", "dashboard", "runs/demo"]
