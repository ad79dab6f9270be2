"""kill -9 at random instants of real two-rank saves, and what must survive each kill.

A campaign is a chain of jobs on one checkpoint root (`job.run`): each job restores, trains and
saves every step until it is killed; the next job restores from what the kill left. An instant is
either a time (a random delay after the job is ready, killing rank 0, rank 1 or both) or an
exact file-system operation (`crashpoints`: the Nth write of a rank file, the manifest's rename,
a removal by retention...), so that the commit and the garbage collection are hit for sure.
Sometimes the kill also loses node 1's local directory (a node gone with its disk).

After each kill, before the next job:
- every committed checkpoint verifies (`elastickit verify`, the CLI, in-process): on the
  persistent tier each `step-*` with a manifest; on the node-local tier, each step whose
  manifest some node holds and whose files the surviving nodes hold between them;
- the newest of those is computed here, independently of elastickit's own catalogue.
Then the next job's restore must pick exactly that step, and its state must hash to the digest
its trainer recorded at that step (bit-exact). At the end a job runs to completion and the
leftovers are counted (incomplete directories older than the newest checkpoint, temp files).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from tests.torture import job as job_mod
from tests.torture.crashpoints import CrashPoint
from tests.torture.procs import Agent, Job

STEP_RE = re.compile(r"^step-(\d{8})$")
_RANK = r"rank-\d{5}\.safetensors(\.zst)?"


@dataclass(frozen=True, slots=True, kw_only=True)
class OpSite:
    """A kind of file-system operation worth dying at."""

    label: str
    kind: str
    pattern: str
    whens: tuple[str, ...]
    victims: tuple[int, ...]
    max_n: int
    tiers: str  # "persistent", "local" or "objstore": the configurations that have it


SITES = (
    OpSite(
        label="persistent: rank file write (mid-file)",
        kind="write",
        pattern=rf"/persistent/step-\d{{8}}/{_RANK}$",
        whens=("half", "after"),
        victims=(0, 1),
        max_n=4,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: rank file fsync",
        kind="fsync",
        pattern=rf"/persistent/step-\d{{8}}/{_RANK}$",
        whens=("before", "after"),
        victims=(0, 1),
        max_n=3,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: manifest temp write",
        kind="write",
        pattern=r"/persistent/step-\d{8}/manifest\.json\.\d+\.tmp$",
        whens=("half", "after"),
        victims=(0,),
        max_n=3,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: manifest fsync",
        kind="fsync",
        pattern=r"/persistent/step-\d{8}/manifest\.json\.\d+\.tmp$",
        whens=("before", "after"),
        victims=(0,),
        max_n=3,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: manifest rename (the commit)",
        kind="replace",
        pattern=r"/persistent/step-\d{8}/manifest\.json$",
        whens=("before", "after"),
        victims=(0,),
        max_n=3,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: step directory fsync",
        kind="fsync",
        pattern=r"/persistent/step-\d{8}$",
        whens=("before", "after"),
        victims=(0, 1),
        max_n=3,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: retention removes a manifest",
        kind="unlink",
        pattern=r"/persistent/step-\d{8}/manifest\.json$",
        whens=("before", "after"),
        victims=(0,),
        max_n=2,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: retention removes a rank file (mid-rmtree)",
        kind="unlink",
        pattern=rf"/persistent/step-\d{{8}}/{_RANK}$",
        whens=("before", "after"),
        victims=(0,),
        max_n=2,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: retention removes a directory",
        kind="rmdir",
        pattern=r"/persistent/step-\d{8}$",
        whens=("before", "after"),
        victims=(0,),
        max_n=2,
        tiers="persistent",
    ),
    OpSite(
        label="persistent: step directory created",
        kind="mkdir",
        pattern=r"/persistent/step-\d{8}$",
        whens=("before", "after"),
        victims=(0, 1),
        max_n=3,
        tiers="persistent",
    ),
    OpSite(
        label="event log append",
        kind="write",
        pattern=r"/persistent/events\.jsonl$",
        whens=("half",),
        victims=(0,),
        max_n=3,
        tiers="persistent",
    ),
    OpSite(
        label="local: rank file write (mid-file)",
        kind="write",
        pattern=rf"/local/\d+/.*step-\d{{8}}/{_RANK}$",
        whens=("half", "after"),
        victims=(0, 1),
        max_n=4,
        tiers="local",
    ),
    OpSite(
        label="local: manifest rename (the commit, node 0)",
        kind="replace",
        pattern=r"/local/0/.*step-\d{8}/manifest\.json$",
        whens=("before", "after"),
        victims=(0,),
        max_n=3,
        tiers="local",
    ),
    OpSite(
        label="local: manifest copy to node 1",
        kind="replace",
        pattern=r"/local/1/.*step-\d{8}/manifest\.json$",
        whens=("before", "after"),
        victims=(1,),
        max_n=3,
        tiers="local",
    ),
    OpSite(
        label="peer copy: write (mid-file)",
        kind="write",
        pattern=rf"/local/\d+/.*step-\d{{8}}/{_RANK}\.\d+\.tmp$",
        whens=("half", "after"),
        victims=(0, 1),
        max_n=3,
        tiers="local",
    ),
    OpSite(
        label="peer copy: rename",
        kind="replace",
        pattern=rf"/local/\d+/.*step-\d{{8}}/{_RANK}$",
        whens=("before", "after"),
        victims=(0, 1),
        max_n=3,
        tiers="local",
    ),
    OpSite(
        label="local: retention removes a manifest",
        kind="unlink",
        pattern=r"/local/\d+/.*step-\d{8}/manifest\.json$",
        whens=("before", "after"),
        victims=(0, 1),
        max_n=2,
        tiers="local",
    ),
    OpSite(
        label="local: retention removes a rank file (mid-rmtree)",
        kind="unlink",
        pattern=rf"/local/\d+/.*step-\d{{8}}/{_RANK}$",
        whens=("before", "after"),
        victims=(0, 1),
        max_n=2,
        tiers="local",
    ),
    OpSite(
        label="object store: part upload (mid-multipart)",
        kind="s3",
        pattern=rf"^upload_part .*/step-\d{{8}}/{_RANK}$",
        whens=("before", "after"),
        victims=(0,),
        max_n=3,
        tiers="objstore",
    ),
    OpSite(
        label="object store: multipart complete",
        kind="s3",
        pattern=rf"^complete_multipart_upload .*/step-\d{{8}}/{_RANK}$",
        whens=("before", "after"),
        victims=(0,),
        max_n=2,
        tiers="objstore",
    ),
    OpSite(
        # Rank 1's file is small (rank 0 alone writes the replicated buffer): one PUT.
        label="object store: a small rank file's single PUT",
        kind="s3",
        pattern=rf"^put_object .*/step-\d{{8}}/{_RANK}$",
        whens=("before", "after"),
        victims=(1,),
        max_n=2,
        tiers="objstore",
    ),
    OpSite(
        label="object store: manifest PUT (the commit)",
        kind="s3",
        pattern=r"^pipe_file .*/step-\d{8}/manifest\.json$",
        whens=("before", "after"),
        victims=(0,),
        max_n=3,
        tiers="objstore",
    ),
    OpSite(
        label="object store: retention deletes a manifest",
        kind="s3",
        pattern=r"^rm_file .*/step-\d{8}/manifest\.json$",
        whens=("before", "after"),
        victims=(0,),
        max_n=2,
        tiers="objstore",
    ),
    OpSite(
        label="object store: retention deletes a step's objects",
        kind="s3",
        pattern=r"^rm .*/step-\d{8}$",
        whens=("before", "after"),
        victims=(0,),
        max_n=2,
        tiers="objstore",
    ),
)


def sites_for(config: str) -> list[OpSite]:
    t = job_mod.tiers(config, "/w")
    have = set()
    if t.persistent is not None:
        have.add("objstore" if "://" in (t.persistent.path or "") else "persistent")
    if t.local is not None:
        have.add("local")
    return [s for s in SITES if s.tiers in have]


@dataclass(frozen=True, slots=True, kw_only=True)
class Instant:
    """One kill: by time (`delay_s` after the job is ready) or at a file-system operation."""

    index: int
    config: str
    label: str
    victims: tuple[int, ...]
    delay_s: float = 0.0
    point: CrashPoint | None = None
    node_loss: bool = False

    def describe(self) -> str:
        who = "both ranks" if len(self.victims) > 1 else f"rank {self.victims[0]}"
        how = f"{self.point.describe()}" if self.point else f"at {self.delay_s:.2f} s"
        return f"{self.label}: {who}, {how}{' + node 1 lost' if self.node_loss else ''}"


def plan(count: int, seed: int, config: str, *, max_delay_s: float = 1.5) -> list[Instant]:
    """`count` instants: every operation site at least once (when count allows), the rest half
    by time, half at random sites."""
    rng = random.Random(seed)
    sites = sites_for(config)
    local = job_mod.tiers(config, "/w").local is not None
    out: list[Instant] = []
    order = list(sites)
    rng.shuffle(order)
    for i in range(count):
        node_loss = local and rng.random() < 0.25
        if i < len(order) or (i >= len(order) and rng.random() < 0.5):
            s = order[i] if i < len(order) else rng.choice(sites)
            point = CrashPoint(
                kind=s.kind, pattern=s.pattern, n=rng.randint(1, s.max_n), when=rng.choice(s.whens)
            )
            out.append(
                Instant(
                    index=i,
                    config=config,
                    label=s.label,
                    victims=(rng.choice(s.victims),),
                    point=point,
                    node_loss=node_loss,
                )
            )
        else:
            victims = rng.choice([(0,), (1,), (0, 1)])
            out.append(
                Instant(
                    index=i,
                    config=config,
                    label="random time",
                    victims=victims,
                    delay_s=rng.uniform(0.0, max_delay_s),
                    node_loss=node_loss,
                )
            )
    return out


# -- what survived ------------------------------------------------------------------------------


def _step_dirs(base: str) -> dict[int, str]:
    """step -> directory, for every `step-*` directory under `base` (run-keyed subfolders too)."""
    out: dict[int, str] = {}
    if not os.path.isdir(base):
        return out
    for dirpath, dirnames, _files in os.walk(base):
        for d in list(dirnames):
            m = STEP_RE.match(d)
            if m:
                out[int(m.group(1))] = os.path.join(dirpath, d)
                dirnames.remove(d)
    return out


def verify_cli(path: str) -> tuple[int, str]:
    """`elastickit verify PATH`, in this process: (exit code, output)."""
    from typer.testing import CliRunner

    from elastickit.cli.main import app

    res = CliRunner().invoke(app, ["verify", path])
    return res.exit_code, (res.output or "") + (
        str(res.exception) if res.exception and res.exit_code not in (0, 1, 2) else ""
    )


@dataclass
class Survey:
    """The committed checkpoints a kill left, and what is wrong with them."""

    persistent: list[int] = field(default_factory=list)
    local: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    verified: int = 0

    @property
    def newest(self) -> int:
        return max([0, *self.persistent, *self.local])


def survey(work: str, config: str) -> Survey:
    """Verify every committed checkpoint left under `work` (independently of elastickit's
    catalogue) and find the newest."""
    sv = Survey()
    t = job_mod.tiers(config, work)
    if t.persistent is not None and "://" in (t.persistent.path or ""):
        _survey_objects(t.persistent.path, sv)
    elif t.persistent is not None:
        for step, d in sorted(_step_dirs(os.path.join(work, "persistent")).items()):
            if not os.path.exists(os.path.join(d, "manifest.json")):
                continue
            code, out = verify_cli(d)
            sv.verified += 1
            if code == 0:
                sv.persistent.append(step)
            else:
                sv.problems.append(
                    f"persistent step {step}: verify exit {code}: {out.strip()[-400:]}"
                )
    if t.local is not None:
        nodes = {}
        base = os.path.join(work, "local")
        for n in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            nodes[n] = _step_dirs(os.path.join(base, n))
        steps = sorted({s for dirs in nodes.values() for s in dirs})
        union_root = os.path.join(work, "_union")
        for step in steps:
            manifests = [
                os.path.join(d[step], "manifest.json")
                for d in nodes.values()
                if step in d and os.path.exists(os.path.join(d[step], "manifest.json"))
            ]
            if not manifests:
                continue
            with open(manifests[0]) as f:
                files = json.load(f)["files"]
            have = {}
            for d in nodes.values():
                if step not in d:
                    continue
                for name, rec in files.items():
                    p = os.path.join(d[step], name)
                    if (
                        name not in have
                        and os.path.exists(p)
                        and os.path.getsize(p) == rec["size_bytes"]
                    ):
                        have[name] = p
            if set(have) != set(files):
                continue  # a node is gone with its files (or retention is removing this step)
            u = os.path.join(union_root, f"step-{step:08d}")
            shutil.rmtree(union_root, ignore_errors=True)
            os.makedirs(u)
            os.symlink(manifests[0], os.path.join(u, "manifest.json"))
            for name, p in have.items():
                os.symlink(p, os.path.join(u, name))
            code, out = verify_cli(u)
            sv.verified += 1
            if code == 0:
                sv.local.append(step)
            else:
                sv.problems.append(f"local step {step}: verify exit {code}: {out.strip()[-400:]}")
        shutil.rmtree(union_root, ignore_errors=True)
    return sv


def _survey_objects(url: str, sv: Survey) -> None:
    """Verify every committed step of an object-store root (every byte against its checksums)."""
    from elastickit.checkpoint.errors import ElastickitError
    from elastickit.checkpoint.storage.objstore import ObjectRoot

    store = ObjectRoot(url)
    store.fs.invalidate_cache()  # the listing as the store has it now, not as this process saw it
    for step in store.committed_steps():
        try:
            problems = store.verify_step(step)
        except ElastickitError as e:  # listed with its manifest a moment ago
            problems = [f"lost after it was listed as committed: {e}"]
        sv.verified += 1
        if problems:
            sv.problems.append(f"object store step {step}: {[str(p) for p in problems][:3]}")
        else:
            sv.persistent.append(step)


def leftovers(work: str, config: str, newest: int) -> list[str]:
    """Incomplete step directories older than the newest checkpoint, and temp files, on every tier."""
    out = []
    t = job_mod.tiers(config, work)
    if t.persistent is not None and "://" in (t.persistent.path or ""):
        from elastickit.checkpoint.storage.objstore import ObjectRoot

        store = ObjectRoot(t.persistent.path)
        store.fs.invalidate_cache()
        done = set(store.committed_steps())
        out += [
            f"incomplete {store.step_url(step)} ({sorted(objs)})"
            for step, objs in store.objects().items()
            if step < newest and step not in done
        ]
    for base in (os.path.join(work, "persistent"), os.path.join(work, "local")):
        for step, d in _step_dirs(base).items():
            if step < newest and not os.path.exists(os.path.join(d, "manifest.json")):
                if base.endswith("local") and os.listdir(d) == []:
                    continue
                out.append(f"incomplete {d} ({sorted(os.listdir(d))})")
            if step <= newest:
                out.extend(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".tmp"))
    return out


def merged_event_lines(work: str) -> int:
    """Lines of the event log that hold a torn record and a whole one after it (the whole one is
    lost to readers): a kill mid-append may lose its own record, never the next."""
    path = os.path.join(work, "persistent", "events.jsonl")
    bad = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    json.loads(line)
                except ValueError:
                    bad += line.count('{"type":') > 1
    except FileNotFoundError:
        pass
    return bad


# -- the campaign ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one kill did and what the next job found."""

    instant: Instant
    hit: bool = False  # the kill happened (the operation was reached, or the timer fired)
    hit_what: str = ""
    expected_step: int = 0
    restored_step: int | None = None
    bit_exact: bool | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Report:
    config: str
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    final_problems: list[str] = field(default_factory=list)
    verified: int = 0
    merged_event_lines: int = 0

    @property
    def kills(self) -> int:
        return sum(o.hit for o in self.outcomes)

    @property
    def failures(self) -> list[str]:
        out = [
            f"#{o.instant.index} {o.instant.describe()}: {p}"
            for o in self.outcomes
            for p in o.problems
        ]
        if self.merged_event_lines:
            out.append(
                f"{self.merged_event_lines} event log line(s) hold a torn record and a whole one after it"
            )
        return out + self.final_problems


def _digest(work: str, rank: int, step: int) -> dict[str, str] | None:
    try:
        with open(os.path.join(work, "digests", f"rank-{rank}", f"{step}.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _check_restore(
    job: Job, work: str, expected: int, world: int, outcome: Outcome, step0: dict[int, Any]
) -> bool:
    """The job restored `expected`, bit-exact on every rank. False when the job did not get there."""
    if not job.wait_files([f"ready-{r}" for r in range(world)], timeout_s=120):
        errors = job.errors()
        outcome.problems.append(
            "the next job did not finish its restore: "
            + (
                "; ".join(f"rank {r}: {e.strip().splitlines()[-1]}" for r, e in errors.items())
                or "timeout"
            )
        )
        for r, e in errors.items():
            outcome.problems.append(f"rank {r} traceback:\n{e[-3000:]}")
        return False
    got = [job.read(f"restored-{r}.json") for r in range(world)]
    steps = {g["step"] for g in got}
    outcome.restored_step = min(steps)
    if steps != {expected}:
        outcome.problems.append(
            f"restore picked step(s) {sorted(steps)}, the newest committed is {expected}"
        )
        return True
    exact = True
    for r, g in enumerate(got):
        want = _digest(work, r, expected) if expected else step0.get(r)
        if expected == 0 and want is None:
            step0[r] = g["digest"]
            continue
        if want != g["digest"]:
            exact = False
            diff = sorted(
                k
                for k in set(want or {}) | set(g["digest"])
                if (want or {}).get(k) != g["digest"].get(k)
            )
            outcome.problems.append(
                f"rank {r}: restored step {expected} differs from what was saved in {diff[:4]}"
            )
    outcome.bit_exact = exact
    return True


def campaign(
    work: str,
    *,
    config: str,
    count: int,
    seed: int,
    world: int = 2,
    steps: int = 400,
    step_s: float = 0.01,
    max_delay_s: float = 1.5,
    log: Any = None,
    env: dict[str, str] | None = None,
) -> Report:
    """Run `count` kill instants on one checkpoint root under `work`; return what happened."""
    instants = plan(count, seed, config, max_delay_s=max_delay_s)
    report = Report(config=config, seed=seed)
    agent = Agent()
    step0: dict[int, Any] = {}
    cfg = {"work": work, "config": config, "steps": steps, "step_s": step_s, "timeout_s": 60.0}
    pending: Outcome | None = None  # the kill whose aftermath the next job checks
    expected = 0
    try:
        for inst in [*instants, None]:
            t0 = time.monotonic()
            jdir = os.path.join(work, "jobs", f"{len(report.outcomes) + (pending is not None):04d}")
            crash = (
                {v: inst.point.to_json() for v in inst.victims}
                if inst is not None and inst.point
                else None
            )
            final = inst is None
            job = agent.start(
                job_mod.run,
                world,
                jdir,
                ({**cfg, "steps": 12 if final else steps},),
                crash=crash,
                env=env,
            )
            check = pending or Outcome(
                instant=Instant(index=-1, config=config, label="first start", victims=(0,))
            )
            ok = _check_restore(job, work, expected, world, check, step0)
            if pending is not None:
                report.outcomes.append(pending)
                if log:
                    log(pending)
            if not ok:
                job.kill()
                if pending is None:
                    report.final_problems.extend(check.problems)
                break
            outcome = Outcome(instant=inst) if inst is not None else None
            if final:
                if not job.wait_exit(120):
                    report.final_problems.append("the final job did not finish within 120 s")
                errs = job.errors()
                report.final_problems.extend(
                    f"final job rank {r}: {e[-2000:]}" for r, e in errs.items()
                )
                job.kill()
            elif inst.point is not None:
                job.wait_exit(60, any_rank=True)
                hit = [job.read(f"crashed-{v}.json") for v in inst.victims]
                outcome.hit = any(h is not None for h in hit)
                outcome.hit_what = "; ".join(
                    f"{h['when']} {h['kind']} {h['path'][len(work) :]}" for h in hit if h
                )
                errs = job.errors()
                job.kill()
                if errs and not outcome.hit:  # after a kill the survivors fail on their own
                    outcome.problems.extend(
                        f"rank {r} raised:\n{e[-2000:]}" for r, e in errs.items()
                    )
            else:
                time.sleep(inst.delay_s)
                alive = job.alive()
                outcome.hit = all(v in alive for v in inst.victims)
                job.kill(list(inst.victims))
                job.kill()
                outcome.hit_what = f"{time.monotonic() - t0:.2f} s after start"
                errs = job.errors()
                if errs and not outcome.hit:
                    outcome.problems.extend(
                        f"rank {r} raised:\n{e[-2000:]}" for r, e in errs.items()
                    )
            if final:
                break
            if inst.node_loss:
                shutil.rmtree(os.path.join(work, "local", "1"), ignore_errors=True)
            sv = survey(work, config)
            report.verified += sv.verified
            outcome.problems.extend(sv.problems)
            expected = outcome.expected_step = sv.newest
            outcome.seconds = time.monotonic() - t0
            pending = outcome
        sv = survey(work, config)
        report.verified += sv.verified
        report.final_problems.extend(sv.problems)
        report.final_problems.extend(
            f"left behind: {x}" for x in leftovers(work, config, sv.newest)
        )
        report.merged_event_lines = merged_event_lines(work)
    finally:
        agent.close()
    return report
