"""`elastickit train` end to end: torchrun starts the ranks, rank 0 prints each step; a bad
request, a crash, a signal each end in one sentence, and no worker outlives the command."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import psutil
import pytest
from elastickit.checkpoint.format.directory import list_checkpoints
from elastickit.checkpoint.events import read_events

from elastickit.trainer.report import checkpoint_lines

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(240)]

CLI = [sys.executable, "-m", "elastickit.cli.main", "train"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=200,
        env=_env(),
        check=False,
        **kwargs,
    )


def _committed(ckpt: str) -> list[int]:
    return [c.step for c in list_checkpoints(ckpt) if c.complete]


def test_train_prints_steps_and_resumes_from_its_checkpoint(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    first = _cli("--layout", "dp=2", "--steps", "4", "--ckpt", ckpt, "--every", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    lines = re.findall(
        r"^step (\d+)/4  loss ([0-9.]+)  step_time ([0-9.]+) s$", first.stdout, re.MULTILINE
    )
    assert [int(s) for s, _, _ in lines] == [1, 2, 3, 4], first.stdout
    assert "layout dp=2 on 2 ranks" in first.stdout
    # The run's checkpoints, as its event log records them (superseded ones included).
    summary = checkpoint_lines(read_events(os.path.join(ckpt, "events.jsonl")), ckpt)
    committed = ", ".join(map(str, _committed(ckpt)))
    assert summary[0] == f"checkpoints: steps {committed} committed in {ckpt}"
    assert first.stdout.rstrip("\n").splitlines()[-len(summary) :] == summary
    again = _cli("--layout", "tp=2", "--steps", "6", "--ckpt", ckpt, "--every", "2")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert re.findall(r"^step (\d+)/6", again.stdout, re.MULTILINE) == ["5", "6"]
    assert "(resumed from step 4)" in again.stdout, again.stdout
    assert again.stderr == ""


def test_train_rejects_a_bad_request_with_exit_2(tmp_path) -> None:
    bad = _cli("--layout", "dp=2,tp=2", "--nproc", "3")
    assert bad.returncode == 2
    assert "--nproc 3 does not match --layout dp=2,tp=2 (4 ranks)" in bad.stderr
    assert "Traceback" not in bad.stderr
    # Found before launch, not by every rank after it: one sentence, exit 2.
    # (the unit tests go through every other option)
    r = _cli("--layout", "tp=3")
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.startswith("error: --layout tp=3: model tiny has 4 attention heads")
    assert r.stderr.count("\n") == 1, r.stderr


def test_train_refuses_a_checkpoint_of_another_model(tmp_path) -> None:
    from elastickit.trainer import TrainConfig, run_training

    ckpt = str(tmp_path / "ckpt")  # what `train --steps 2 --ckpt CKPT` leaves, made in-process
    run_training(TrainConfig(model="tiny", steps=2, seq_len=8, ckpt_dir=ckpt, ckpt_every=2))
    r = _cli("--model", "tiny-moe", "--layout", "dp=2", "--ckpt", ckpt)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        f"error: --ckpt {ckpt}: its checkpoint of step 2 holds another model: "
    ), r.stderr
    assert r.stderr.rstrip().endswith("pass --model tiny, or another --ckpt")


def _unprivileged() -> list[str]:
    """A command prefix that runs as a user who cannot write a 0o555 directory (root can)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a directory unwritable")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import elastickit.trainer.launch"],
        capture_output=True,
        env=_env(),
        cwd=tempfile.gettempdir(),
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot run this Python as user nobody: {probe.stderr.decode()[-300:]}")
    return prefix


def test_train_refuses_a_read_only_checkpoint_root_before_launch() -> None:
    prefix = _unprivileged()
    base = tempfile.mkdtemp(prefix="ek-ro-")  # not under pytest's 0o700 tmp: nobody must reach it
    ro = os.path.join(base, "ckpt")
    try:
        os.chmod(base, 0o755)
        os.mkdir(ro)
        os.chmod(ro, 0o555)
        r = subprocess.run(
            [*prefix, *CLI, "--layout", "dp=2", "--steps", "3", "--ckpt", ro, "--every", "1"],
            capture_output=True,
            text=True,
            timeout=200,
            env=_env(),
            cwd=base,
            check=False,
        )
        assert (r.returncode, r.stdout) == (2, ""), r.stdout + r.stderr
        assert r.stderr == (
            f"error: --ckpt {ro} is not writable (Permission denied); "
            "choose a writable directory or fix its permissions\n"
        )
    finally:
        os.chmod(ro, 0o755)
        shutil.rmtree(base)


def test_an_injected_crash_is_one_line_with_how_to_resume(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    spec = "crash:rank=1:step=5"
    r = _cli("--layout", "dp=2", "--steps", "8", "--ckpt", ckpt, "--every", "2", "--inject", spec)
    assert r.returncode == 1, r.stdout + r.stderr
    # Rank 0's step lines stay on the console; the ranks' noise goes to the log.
    assert re.findall(r"^step (\d+)/8", r.stdout, re.MULTILINE) == ["1", "2", "3", "4"]
    log = os.path.join(ckpt, "train.log")
    last = _committed(ckpt)[-1] if _committed(ckpt) else None
    assert r.stderr.splitlines() == [
        f"error: rank 1 crashed at step 5: its process exited (injected by --inject {spec})",
        (
            f"last checkpoint: step {last} in {ckpt}; run the same command without --inject to "
            f"resume (details: {log})"
        ),
    ]
    with open(log) as f:
        text = f.read()
    assert f"elastickit.faults: {spec}: crashing at step 5" in text and "Traceback" in text
    # The monitor logs the crash at the step the fault announced (when it saw it before
    # torchrun stopped rank 0, which runs it).
    crashes = [e for e in read_events(os.path.join(ckpt, "events.jsonl")) if e["type"] == "crash"]
    assert all((e["ranks"], e["step"]) == ([1], 5) for e in crashes), crashes


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_stops_every_worker_and_says_how_to_resume(tmp_path, sig) -> None:
    ckpt = str(tmp_path / "ckpt")
    job: list[psutil.Process] = []
    proc = subprocess.Popen(
        [*CLI, "--layout", "dp=2", "--steps", "100000", "--ckpt", ckpt, "--every", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,  # a process group of its own, as a terminal gives a command
    )
    try:
        out = []
        while not _committed(ckpt) or not out or not out[-1].startswith("step "):
            line = proc.stdout.readline()
            assert line, f"the job ended early: {proc.stderr.read()[-3000:]}"
            out.append(line)
        job = psutil.Process(proc.pid).children(recursive=True)
        cmds = [" ".join(p.cmdline()) for p in job]
        workers = [
            c
            for c in cmds
            if "-m elastickit.trainer.worker" in c and "torch.distributed.run" not in c
        ]
        assert len(workers) == 2 and len(job) == 3, cmds
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            proc.send_signal(sig)  # `kill PID`, as a scheduler stops a job
        rest, err = proc.communicate(timeout=120)
        on_disk = sorted(os.listdir(ckpt))
    finally:
        left = [p.pid for p in job if _alive(p.pid)]
        for p in [proc, *job]:  # whatever the outcome, leave nothing running
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        proc.wait()
    assert proc.returncode == 128 + sig, err
    assert not left, f"processes of the job outlived the command: {left}"
    assert sorted(os.listdir(ckpt)) == on_disk  # no step appeared after the command ended
    steps = _committed(ckpt)
    log = os.path.join(ckpt, "train.log")
    assert err.splitlines() == [
        f"error: interrupted ({signal.Signals(sig).name}): stopped the training job and its 2 ranks",
        (
            f"last checkpoint: step {steps[-1]} in {ckpt}; run the same command to resume "
            f"(details: {log})"
        ),
    ], err
    assert "Traceback" not in rest + err and "KeyboardInterrupt" not in rest + err
    assert os.path.getsize(log) > 0
