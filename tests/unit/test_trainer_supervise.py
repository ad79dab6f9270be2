"""run_job: a stopped job leaves no process behind, whatever its processes do with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from elastickit.trainer.supervise import job_processes

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc"),
]

# A stand-in for torchrun: starts a "worker" in a session of its own (as torchrun does) that
# keeps writing files, writes both pids, then waits; on SIGTERM it stops the worker and exits
# (as torchrun does). `stubborn`: both ignore SIGTERM. `leave`: it exits at once, leaving the
# worker running.
FAKE_TORCHRUN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    out, stubborn, leave = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c", '''
    import os, signal, sys, time
    if sys.argv[1] == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    i = 0
    while True:
        i += 1
        open(os.path.join(sys.argv[2], f"step-{i}"), "w").close()
        time.sleep(0.05)
    ''', sys.argv[2], os.path.dirname(out)], start_new_session=True)
    def stop(signum, frame):  # as torchrun does: stop the workers, wait for them, exit
        worker.terminate()
        worker.wait()
        sys.exit(128 + signum)
    if not stubborn:
        signal.signal(signal.SIGTERM, stop)
    with open(out + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {worker.pid}")
    os.replace(out + ".tmp", out)
    if leave:
        sys.exit(0)
    while True:
        time.sleep(1)
    """
)

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    from elastickit.trainer.supervise import run_job
    fake, out, stubborn, leave = sys.argv[1:5]
    r = run_job([sys.executable, fake, out, stubborn, leave], env=dict(os.environ),
                log_path=out + ".log", grace_s=1.0, header="=== test")
    print(json.dumps({"returncode": r.returncode, "stopped_by": r.stopped_by, "killed": r.killed}))
    """
)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False


def _start(tmp_path, stubborn: bool, leave: bool) -> tuple[subprocess.Popen, str]:
    fake = tmp_path / "fake_torchrun.py"
    fake.write_text(FAKE_TORCHRUN)
    (tmp_path / "steps").mkdir()
    out = str(tmp_path / "steps" / "pids")
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(fake), out, str(int(stubborn)), str(int(leave))],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return driver, out


def _pids(out: str, driver: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 60
    while not os.path.exists(out):
        assert driver.poll() is None and time.monotonic() < deadline, "the fake job never started"
        time.sleep(0.05)
    with open(out) as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.parametrize("stubborn", [False, True], ids=["obeys-sigterm", "ignores-sigterm"])
def test_a_stop_signal_ends_every_process_of_the_job(tmp_path, stubborn: bool) -> None:
    driver, out = _start(tmp_path, stubborn, leave=False)
    pids = _pids(out, driver)
    assert all(_alive(p) for p in pids)
    driver.send_signal(signal.SIGTERM)
    stdout, _ = driver.communicate(timeout=60)
    result = json.loads(stdout)
    assert result["stopped_by"] == signal.SIGTERM
    assert not [p for p in pids if _alive(p)], "a process of the job outlived the command"
    # Only processes that ignored SIGTERM needed SIGKILL (after the 1 s grace).
    assert set(result["killed"]) == (set(pids) if stubborn else set())
    assert (tmp_path / "steps" / "pids.log").read_text().startswith("=== test\n")


def test_a_worker_left_behind_by_its_launcher_is_killed(tmp_path) -> None:
    driver, out = _start(tmp_path, stubborn=False, leave=True)
    pids = _pids(out, driver)
    stdout, _ = driver.communicate(timeout=60)
    result = json.loads(stdout)
    assert result["returncode"] == 0 and result["stopped_by"] is None
    assert result["killed"] == [pids[1]] and not _alive(pids[1])


def test_job_processes_finds_only_the_token(tmp_path) -> None:
    env = {**os.environ, "ELASTICKIT_JOB": "t-123"}
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        assert job_processes("t-123") == [p.pid] and job_processes("t-12") == []
    finally:
        p.kill()
        p.wait()
    assert job_processes("t-123") == []
