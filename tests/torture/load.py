"""Load (issue 17, item 5): many real ranks saving every step, small state, through every tier.

Each rank trains a tiny model and calls `save` every step with memory, node-local with peer
copies, and persistent tiers (two ranks per node), for `duration_s`. Every second it samples
its resident set size and open file descriptors (from /proc). Afterwards the parent checks:

- no deadlock: every rank finished its loop and closed within the timeout;
- flat resources: after a warm-up (the first quarter), RSS grows by less than `rss_slack` and
  the descriptor count by at most `fd_slack` on every rank (a leak of one buffer or descriptor
  per save would break both within a minute at these rates);
- every save accounted for: for every step rank 0 saved, its event log holds a `checkpoint`
  record whose every file tier says committed, superseded (by which step) or failed (why), or
  a `checkpoint_skipped` record with a reason;
- the newest committed checkpoint verifies (`elastickit verify`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from tests.torture.kills import _step_dirs, verify_cli
from tests.torture.procs import Agent


def _rss_and_fds() -> tuple[int, int]:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return rss, len(os.listdir("/proc/self/fd"))


def rank_loop(rank: int, world: int, job_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ranks' side: train and save every step for cfg['duration_s'] seconds."""
    import torch
    import torch.distributed as dist
    from elastickit.checkpoint.tiers import Tiers, TierSpec

    import elastickit as ek

    work = cfg["work"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tiers = Tiers(
        local=TierSpec(
            path=os.path.join(work, "local", "{node}"), keep_last=2, max_busy_fraction=1.0
        ),
        peer=True,
        persistent=TierSpec(keep_last=2, max_busy_fraction=1.0),
        ranks_per_node=cfg.get("ranks_per_node", 2),
    )
    ck = ek.Checkpointer(os.path.join(work, "persistent"), every=1, tiers=tiers, timeout_s=120)
    samples: list[tuple[float, int, int, int]] = []
    handles = {"scheduled": 0, "not_taken": 0}
    t0 = time.monotonic()
    next_sample = t0
    step = 0
    stop = torch.zeros(1)
    while True:
        step += 1
        g = torch.Generator().manual_seed(step * 64 + rank)
        optim.zero_grad()
        model(torch.randn(4, 32, generator=g)).pow(2).mean().backward()
        for p in model.parameters():  # data parallel: the ranks stay in step
            dist.all_reduce(p.grad)
        optim.step()
        h = ck.save(step, {"model": model, "optim": optim, "data": {"pos": step}})
        handles["scheduled" if h.scheduled else "not_taken"] += 1
        now = time.monotonic()
        if now >= next_sample:
            rss, fds = _rss_and_fds()
            samples.append((round(now - t0, 2), step, rss, fds))
            next_sample = now + 1.0
        # Rank 0 decides when to stop; everyone learns it in the same collective.
        stop.fill_(1.0 if rank == 0 and now - t0 >= cfg["duration_s"] else 0.0)
        dist.all_reduce(stop)
        if stop.item():
            break
    ck.close()
    rss, fds = _rss_and_fds()
    samples.append((round(time.monotonic() - t0, 2), step, rss, fds))
    return {"steps": step, "samples": samples, "handles": handles}


@dataclass
class LoadReport:
    world: int
    duration_s: float
    steps: int = 0
    checkpoints: dict[str, int] = field(default_factory=dict)  # status -> count (rank 0's log)
    rss_growth: list[int] = field(default_factory=list)  # per rank, bytes after warm-up
    fd_growth: list[int] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)  # per rank, at the end
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _status(rec: dict[str, Any]) -> list[str]:
    if rec["type"] == "checkpoint_skipped":
        return ["skipped"]
    out = []
    for tier, t in rec.get("tiers", {}).items():
        s = str(t.get("status", ""))
        kind = s.split(":")[0].split(" by ")[0]
        out.append(f"{tier} {kind}")
    return out


def run(
    work: str,
    *,
    world: int,
    duration_s: float,
    rss_slack: int = 48 << 20,
    fd_slack: int = 4,
    agent: Agent | None = None,
) -> LoadReport:
    """Run the load job and check what must hold."""
    rep = LoadReport(world=world, duration_s=duration_s)
    t0 = time.monotonic()
    own = agent is None
    agent = agent or Agent()
    jdir = os.path.join(work, "job")
    try:
        job = agent.start(rank_loop, world, jdir, ({"work": work, "duration_s": duration_s},))
        if not job.wait_exit(duration_s + 240):
            rep.problems.append(
                f"deadlock: ranks {job.alive()} still running {duration_s + 240:.0f} s in"
            )
            job.kill()
            return rep
        errors = job.errors()
        if errors:
            rep.problems.extend(f"rank {r} raised:\n{e[-2000:]}" for r, e in errors.items())
            return rep
        results = [job.read(f"result-{r}.json") for r in range(world)]
    finally:
        if own:
            agent.close()
    rep.steps = results[0]["steps"]
    for r, res in enumerate(results):
        samples = res["samples"]
        warm = [s for s in samples if s[0] >= duration_s / 4] or samples[-1:]
        rss0, fd0 = warm[0][2], warm[0][3]
        rep.rss_growth.append(max(s[2] for s in warm) - rss0)
        rep.fd_growth.append(max(s[3] for s in warm) - fd0)
        rep.rss_mib.append(round(samples[-1][2] / 2**20, 1))
        if rep.rss_growth[-1] > rss_slack:
            rep.problems.append(
                f"rank {r}: RSS grew by {rep.rss_growth[-1] / 2**20:.1f} MiB after warm-up"
            )
        if rep.fd_growth[-1] > fd_slack:
            rep.problems.append(
                f"rank {r}: open file descriptors grew by {rep.fd_growth[-1]} after warm-up"
            )
    # Every save rank 0 made is in its event log, with what became of it on each tier.
    with open(os.path.join(work, "persistent", "events.jsonl"), encoding="utf-8") as f:
        events = [json.loads(x) for x in f if x.strip()]
    by_step: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("type") in ("checkpoint", "checkpoint_skipped"):
            by_step.setdefault(e["step"], []).append(e)
    missing = [s for s in range(1, rep.steps + 1) if s not in by_step]
    if missing:
        rep.problems.append(
            f"{len(missing)} save(s) missing from the event log, first {missing[:5]}"
        )
    twice = [s for s, recs in by_step.items() if len(recs) > 1]
    if twice:
        rep.problems.append(f"saves recorded twice: {twice[:5]}")
    for s, recs in sorted(by_step.items()):
        for rec in recs:
            for label in _status(rec):
                rep.checkpoints[label] = rep.checkpoints.get(label, 0) + 1
            if rec["type"] == "checkpoint":
                tiers = rec.get("tiers", {})
                if set(tiers) != {"local", "persistent"}:
                    rep.problems.append(f"step {s}: the record names tiers {sorted(tiers)}")
                for tier, t in tiers.items():
                    st = str(t.get("status", ""))
                    ok = (
                        st == "committed"
                        or st.startswith("superseded by step ")
                        or (st.startswith("failed: ") and len(st) > len("failed: "))
                    )
                    if not ok:
                        rep.problems.append(f"step {s} on {tier}: status {st!r} says nothing")
            elif not rec.get("skipped_tiers"):
                rep.problems.append(f"step {s}: skipped without a reason")
    failed = {k: v for k, v in rep.checkpoints.items() if k.endswith("failed")}
    if failed:
        rep.problems.append(f"saves failed under load: {failed}")
    dirs = _step_dirs(os.path.join(work, "persistent"))
    done = [s for s, d in dirs.items() if os.path.exists(os.path.join(d, "manifest.json"))]
    if not done:
        rep.problems.append("no checkpoint committed on the persistent tier")
    else:
        code, text = verify_cli(dirs[max(done)])
        if code != 0:
            rep.problems.append(
                f"the newest checkpoint (step {max(done)}) does not verify: {text[-300:]}"
            )
        if max(done) != rep.steps:
            rep.problems.append(
                f"close() left step {max(done)} as the newest, not the last step {rep.steps}"
            )
    rep.seconds = round(time.monotonic() - t0, 1)
    return rep
