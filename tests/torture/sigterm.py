"""SIGTERM at random instants of real two-rank training (issue 17, item 6).

The job trains an FSDP2 model with a Checkpointer that saves every 7th step
(`sigterm_grace_s=GRACE`), and records after every optimizer step the step it trained and a
digest of its state. The parent sends SIGTERM at a random instant to both ranks (as torchrun
forwards it), to one of them (one node preempted), or to both a few milliseconds apart. What
must hold: the ranks exit within the grace period; the newest committed checkpoint is the last
step any rank trained (not the last due step), it verifies, and a new job restores it bit-exact;
the event log records the SIGTERM save.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from tests.torture import job as job_mod
from tests.torture.kills import _step_dirs, verify_cli
from tests.torture.procs import Agent

GRACE_S = 20.0
EVERY = 7


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def train(rank: int, world: int, job_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Train and save every EVERY steps until SIGTERM ends the process (or steps run out)."""
    from elastickit.checkpoint.tiers import Tiers, TierSpec

    import elastickit as ek

    model, optim = job_mod.build()
    state: dict[str, Any] = {"model": model, "optim": optim, "data": {"pos": 0}}
    tiers = Tiers(persistent=TierSpec(max_busy_fraction=0.05), ranks_per_node=1)
    ck = ek.Checkpointer(
        cfg["root"], every=EVERY, tiers=tiers, timeout_s=60, sigterm_grace_s=GRACE_S
    )
    try:
        for step in range(1, 100_000):
            job_mod.train_step(model, optim, step - 1, rank)
            state["data"] = {"pos": step}
            _write_json(
                os.path.join(job_dir, f"digest-{rank}-{step}.json"),
                job_mod.digest(model, optim, state["data"]),
            )
            _write_json(os.path.join(job_dir, f"trained-{rank}.json"), step)
            if step == 3:
                open(os.path.join(job_dir, f"ready-{rank}"), "w").close()
            ck.save(step, state)
            time.sleep(cfg["step_s"])
    except SystemExit as e:  # the rank that was not signalled leaves with the one that was
        return {"exit": e.code}
    return {"exit": None}


def restore(rank: int, world: int, job_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from elastickit.checkpoint.tiers import Tiers, TierSpec

    import elastickit as ek

    model, optim = job_mod.build(seed=5)
    state: dict[str, Any] = {"model": model, "optim": optim, "data": {"pos": 0}}
    tiers = Tiers(persistent=TierSpec(), ranks_per_node=1)
    with ek.Checkpointer(cfg["root"], every=EVERY, tiers=tiers, timeout_s=60) as ck:
        step = ck.restore(state)
    return {"step": step, "digest": job_mod.digest(model, optim, state["data"])}


@dataclass
class SigtermTrial:
    how: str
    delay_s: float
    trained: int = 0  # the last step any rank trained
    saved: int = 0  # the newest committed checkpoint afterwards
    exit_s: float = 0.0  # from the (first) signal to the last rank's exit
    exit_codes: list[int | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class SigtermReport:
    grace_s: float
    trials: list[SigtermTrial] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [f"{t.how} at {t.delay_s:.2f} s: {p}" for t in self.trials for p in t.problems]


HOWS = ("both", "rank 0 only", "rank 1 only", "both, 30 ms apart")


def trial(
    agent: Agent, work: str, how: str, delay_s: float, *, step_s: float = 0.02
) -> SigtermTrial:
    t = SigtermTrial(how=how, delay_s=delay_s)
    root = os.path.join(work, "root")
    jdir = os.path.join(work, "train")
    job = agent.start(train, 2, jdir, ({"root": root, "step_s": step_s},))
    try:
        if not job.wait_files(["ready-0", "ready-1"], 120):
            t.problems.append(f"the job did not start: {job.errors()}")
            return t
        time.sleep(delay_s)
        pids = [p.pid for p in job.procs]
        t0 = time.monotonic()
        if how == "both":
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
        elif how == "rank 0 only":
            os.kill(pids[0], signal.SIGTERM)
        elif how == "rank 1 only":
            os.kill(pids[1], signal.SIGTERM)
        else:
            os.kill(pids[0], signal.SIGTERM)
            time.sleep(0.03)
            os.kill(pids[1], signal.SIGTERM)
        if not job.wait_exit(GRACE_S + 30):
            t.problems.append(f"ranks {job.alive()} still alive {GRACE_S + 30:.0f} s after SIGTERM")
            return t
        t.exit_s = time.monotonic() - t0
        t.exit_codes = job.exit_codes()
    finally:
        if job.alive():
            job.kill()
    if t.exit_s > GRACE_S:
        t.problems.append(
            f"the ranks exited {t.exit_s:.1f} s after SIGTERM, past the grace of {GRACE_S} s"
        )
    errors = job.errors()
    if errors:
        t.problems.extend(f"rank {r} raised:\n{e[-1500:]}" for r, e in errors.items())
    trained = [job.read(f"trained-{r}.json") for r in range(2)]
    t.trained = max(trained)
    if len(set(trained)) != 1:
        t.problems.append(f"the ranks stopped at different steps: {trained}")
    dirs = _step_dirs(root)
    done = sorted(s for s, d in dirs.items() if os.path.exists(os.path.join(d, "manifest.json")))
    t.saved = done[-1] if done else 0
    if t.saved != t.trained:
        t.problems.append(
            f"the newest checkpoint is step {t.saved}, the last step trained {t.trained}"
        )
        return t
    code, text = verify_cli(dirs[t.saved])
    if code != 0:
        t.problems.append(f"step {t.saved} does not verify: {text[-300:]}")
    with open(os.path.join(root, "events.jsonl"), encoding="utf-8") as f:
        events = [json.loads(x) for x in f if x.strip()]
    if not any(e.get("type") == "sigterm" and e.get("step") == t.saved for e in events):
        t.problems.append("the event log has no sigterm record of the saved step")
    for r, c in enumerate(t.exit_codes):
        signalled = how.startswith("both") or how == f"rank {r} only"
        if signalled and c != -signal.SIGTERM:
            t.problems.append(f"rank {r} (signalled) exited with {c}, not by SIGTERM")
    rjob = agent.start(restore, 2, os.path.join(work, "restore"), ({"root": root},))
    if not rjob.wait_exit(120) or rjob.errors():
        t.problems.append(f"the restore job failed: {rjob.errors()}")
        rjob.kill()
        return t
    for r in range(2):
        got = rjob.read(f"result-{r}.json")
        want = job.read(f"digest-{r}-{t.saved}.json")
        if got["step"] != t.saved or got["digest"] != want:
            t.problems.append(
                f"rank {r}: restored step {got['step']} is not bit-exact with step {t.saved}"
            )
    return t


def campaign(work: str, *, count: int, seed: int) -> SigtermReport:
    rng = random.Random(seed)
    rep = SigtermReport(grace_s=GRACE_S)
    agent = Agent()
    try:
        for i in range(count):
            how = HOWS[i % len(HOWS)]
            rep.trials.append(trial(agent, os.path.join(work, f"t{i}"), how, rng.uniform(0.0, 1.0)))
    finally:
        agent.close()
    return rep
