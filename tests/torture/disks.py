"""A checkpoint root that fills up, turns read-only or vanishes while real ranks train.

The root lives on a small tmpfs mounted for the run (this needs root and a kernel that lets it
mount; `mount_problem()` says why not). The job (`scenario`, 1 or 2 real ranks) commits steps
1-3, then the parent breaks the file system:

- full: a filler file leaves less room than one checkpoint;
- readonly: a read-only bind mount is stacked over the mount point (a remount of the tmpfs
  itself is refused while the writer's lock file is open for writing, as on any file system);
- vanished: an empty tmpfs is stacked over the mount point (an unmounted network file system:
  the path now leads to an empty directory on another file system).

The ranks train and save steps 4-8 meanwhile (each save waited for, so every one is attempted),
then the parent repairs the file system and they save steps 9-10. What must hold: training goes
on (save never raises), every failed save leaves no partial directory behind, steps 1-3 stay
intact, the event log records each failure with its reason once it can be written, nothing is
written elsewhere while the root is gone, and saving resumes when the file system is back.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from tests.torture import job as job_mod
from tests.torture.kills import _step_dirs, verify_cli
from tests.torture.procs import Agent

FAULTS = ("full", "readonly", "vanished")
SIZE = "6m"


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def mount_problem(base: str) -> str | None:
    """Why a tmpfs cannot be mounted here (None: it can)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    probe = os.path.join(base, "probe")
    os.makedirs(probe, exist_ok=True)
    got = _sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe)
    if got.returncode != 0:
        return f"mount -t tmpfs is refused here ({got.stderr.strip()})"
    _sh("umount", probe)
    return None


def _check(got: subprocess.CompletedProcess[str], what: str) -> None:
    if got.returncode != 0:
        raise RuntimeError(f"{what} failed: {got.stderr.strip()}")


def break_fs(fault: str, mnt: str) -> None:
    if fault == "full":
        st = os.statvfs(mnt)
        free = st.f_bavail * st.f_frsize
        with open(os.path.join(mnt, "filler"), "wb") as f:
            f.write(b"\0" * max(0, free - 64 * 1024))  # less than one checkpoint stays free
    elif fault == "readonly":
        _check(_sh("mount", "--bind", mnt, mnt), "bind mount")
        _check(_sh("mount", "-o", "remount,bind,ro", mnt), "read-only remount")
    elif fault == "vanished":
        _check(_sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt), "mount over")
    else:
        raise ValueError(fault)


def repair_fs(fault: str, mnt: str) -> list[str]:
    """Undo the fault; returns what was found written where it should not be (vanished)."""
    strays: list[str] = []
    if fault == "full":
        os.remove(os.path.join(mnt, "filler"))
    else:
        if fault == "vanished":
            strays = sorted(os.path.relpath(os.path.join(d, f), mnt) for d, _, fs in os.walk(mnt) for f in fs)
            strays += sorted(os.path.relpath(os.path.join(d, x), mnt) for d, xs, _ in os.walk(mnt) for x in xs)
        _check(_sh("umount", mnt), "umount of the stacked mount")
    return strays


def _wait_for(path: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):  # the parent changes the file system meanwhile
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def scenario(rank: int, world: int, job_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ranks' side: commit 1-3, wait for the fault, save 4-8, wait for the repair, save 9-10."""
    import logging

    from elastickit.checkpoint.tiers import Tiers, TierSpec

    import elastickit as ek
    from elastickit.errors import ElastickitError

    warnings: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger("elastickit").addHandler(Grab())
    model, optim = job_mod.build()
    tiers = Tiers(persistent=TierSpec(max_busy_fraction=1.0), ranks_per_node=1)
    ck = ek.Checkpointer(cfg["root"], every=1, tiers=tiers, timeout_s=60)
    state: dict[str, Any] = {"model": model, "optim": optim, "data": {"pos": 0}}
    errors: dict[int, str] = {}
    digests = {}

    def step(s: int) -> None:
        job_mod.train_step(model, optim, s - 1, rank)
        state["data"] = {"pos": s}
        digests[s] = job_mod.digest(model, optim, state["data"])
        ck.save(s, state)  # never raises for a tier failure
        try:
            ck.wait()
        except ElastickitError as e:
            errors[s] = str(e)

    for s in range(1, 4):
        step(s)
    open(os.path.join(job_dir, f"committed-{rank}"), "w").close()
    _wait_for(os.path.join(job_dir, "broken"))
    for s in range(4, 9):
        step(s)
    open(os.path.join(job_dir, f"tried-{rank}"), "w").close()
    _wait_for(os.path.join(job_dir, "repaired"))
    for s in range(9, 11):
        step(s)
    close_error = ""
    try:
        ck.close()
    except ElastickitError as e:
        close_error = str(e)
    return {"errors": errors, "warnings": warnings, "close_error": close_error, "digests": digests}


@dataclass
class DiskOutcome:
    fault: str
    world: int
    failed_steps: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    committed_after: list[int] = field(default_factory=list)


def run_fault(base: str, fault: str, *, world: int, agent: Agent | None = None) -> DiskOutcome:
    """Mount a tmpfs under `base`, run the scenario with `fault`, and check what must hold."""
    out = DiskOutcome(fault=fault, world=world)
    mnt = os.path.join(base, f"mnt-{fault}-{world}")
    os.makedirs(mnt, exist_ok=True)
    _check(_sh("mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", mnt), "tmpfs mount")
    own_agent = agent is None
    agent = agent or Agent()
    root = os.path.join(mnt, "ckpt")
    jdir = os.path.join(base, f"job-{fault}-{world}")
    job = agent.start(scenario, world, jdir, ({"root": root},))
    broken = False
    try:
        if not job.wait_files([f"committed-{r}" for r in range(world)], 120):
            raise RuntimeError(f"the job did not commit steps 1-3: {job.errors()}")
        before = {s: _files(d) for s, d in _step_dirs(root).items()}
        break_fs(fault, mnt)
        broken = True
        open(os.path.join(jdir, "broken"), "w").close()
        if not job.wait_files([f"tried-{r}" for r in range(world)], 120):
            raise RuntimeError(f"the job did not go on training: {job.errors()}")
        strays = repair_fs(fault, mnt)
        broken = False
        if strays:
            out.problems.append(f"written onto the file system that replaced the root: {strays}")
        # While broken: no partial checkpoint left behind, steps 1-3 untouched.
        dirs = _step_dirs(root)
        partial = sorted(s for s, d in dirs.items() if not os.path.exists(os.path.join(d, "manifest.json")))
        if partial:
            out.problems.append(f"partial checkpoint directories left behind: steps {partial}")
        for s, files in before.items():
            if s not in dirs or _files(dirs[s]) != files:
                out.problems.append(f"committed step {s} changed while the file system was broken")
        open(os.path.join(jdir, "repaired"), "w").close()
        if not job.wait_exit(120):
            raise RuntimeError("the job did not finish after the repair")
        errors = job.errors()
        if errors:
            raise RuntimeError(f"a rank raised: {errors}")
        results = [job.read(f"result-{r}.json") for r in range(world)]
        out.failed_steps = sorted(int(s) for s in results[0]["errors"])
        if not set(range(4, 9)) <= set(out.failed_steps) and fault != "full":
            out.problems.append(f"saves 4-8 should fail while the root is {fault}; failed: {out.failed_steps}")
        if not out.failed_steps:
            out.problems.append("no save failed while the file system was broken")
        if any(s >= 9 for s in out.failed_steps):
            out.problems.append(f"saving did not resume after the repair: {results[0]['errors']}")
        if any(r["close_error"] for r in results):
            out.problems.append(f"close() raised after the repair: {results[0]['close_error']}")
        if not any("step" in w or "checkpoint" in w for w in results[0]["warnings"]):
            out.problems.append("no warning was logged for the failed saves")
        # Every committed checkpoint verifies; 1-3 and the repaired ones are there.
        dirs = _step_dirs(root)
        out.committed_after = sorted(s for s, d in dirs.items() if os.path.exists(os.path.join(d, "manifest.json")))
        for s in out.committed_after:
            code, text = verify_cli(dirs[s])
            if code != 0:
                out.problems.append(f"step {s} does not verify: {text.strip()[-300:]}")
        if not {1, 2, 3, 10} <= set(out.committed_after):
            out.problems.append(f"committed after the repair: {out.committed_after}; want 1-3 and 10")
        # The event log says why each failed save failed.
        with open(os.path.join(root, "events.jsonl"), encoding="utf-8") as f:
            events = [json.loads(x) for x in f if x.strip()]
        failed = {e["step"]: e for e in events if e.get("type") == "checkpoint"
                  and any(str(t.get("status", "")).startswith("failed") for t in e.get("tiers", {}).values())}
        missing = [s for s in out.failed_steps if s not in failed]
        if missing:
            out.problems.append(f"the event log has no failure record for steps {missing}")
        out.reasons = sorted(
            {t["status"].replace(mnt, "<tmpfs>")[:160] for e in failed.values() for t in e["tiers"].values()}
        )
    finally:
        if job.alive():
            job.kill()
        if broken:
            repair_fs(fault, mnt)
        if own_agent:
            agent.close()
        got = _sh("umount", mnt)
        if got.returncode != 0:
            _sh("umount", "-l", mnt)
    return out


def _files(d: str) -> dict[str, tuple[int, float]]:
    return {n: (os.path.getsize(os.path.join(d, n)), os.path.getmtime(os.path.join(d, n))) for n in os.listdir(d)}
