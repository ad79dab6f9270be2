"""Damaged peer copies (two real ranks, each its own node): the restore must notice and fall back.

Two jobs of two ranks save steps 1-3 on the node-local tier with peer copies (node 0 holds rank 1's
file, node 1 holds rank 0's). A trial damages a file of step 3 at random, either a peer copy
while the node that holds the original is lost (the peer copy is then the only source), or an
original while its peer copy is intact, and restores in a fresh two-rank job: it must pick step 2,
bit-exact on both ranks, with a `restore_fallback` event that names the damaged file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any

from tests.torture import job as job_mod
from tests.torture.corruption import Mutation, Restorer, random_mutation
from tests.torture.kills import _step_dirs
from tests.torture.procs import Agent


def _tiers(work: str) -> Any:
    from elastickit.checkpoint.tiers import Tiers, TierSpec

    local = TierSpec(path=os.path.join(work, "local", "{node}"), max_busy_fraction=1.0)
    return Tiers(memory=None, local=local, peer=True, persistent=None, ranks_per_node=1)


def save_steps(rank: int, world: int, job_dir: str, work: str) -> dict[str, Any]:
    """Train and commit steps 1-3 on every rank; return each step's digest of this rank."""
    import elastickit as ek

    model, optim = job_mod.build()
    digests = {}
    with ek.Checkpointer(os.path.join(work, "persistent"), tiers=_tiers(work), lazy="never") as ck:
        for step in range(1, 4):
            job_mod.train_step(model, optim, step, rank)
            data = {"pos": step}
            ck.save(step, {"model": model, "optim": optim, "data": data})
            ck.wait()
            digests[step] = job_mod.digest(model, optim, data)
    return digests


def restore(rank: int, world: int, job_dir: str, work: str) -> dict[str, Any]:
    """Restore into a fresh model; return the step and this rank's digest."""
    import torch

    import elastickit as ek

    model, optim = job_mod.build(seed=5)
    for p in model.parameters():
        with torch.no_grad():
            p.fill_(3.0)
    state: dict[str, Any] = {"model": model, "optim": optim, "data": {"pos": -1}}
    with ek.Checkpointer(os.path.join(work, "persistent"), tiers=_tiers(work)) as ck:
        step = ck.restore(state)
    return {"step": step, "digest": job_mod.digest(model, optim, state["data"])}


@dataclass
class PeerTrial:
    file: str  # node/<file> damaged
    mutation: Mutation
    lost: str  # the node directory removed for the trial ("" = none)
    restored_step: int | None = None
    bit_exact: bool = False
    reason: str = ""
    problems: list[str] = field(default_factory=list)


def _run(agent: Agent, fn: Any, work: str, name: str, timeout_s: float = 120) -> list[Any]:
    job = agent.start(fn, 2, os.path.join(work, "jobs", name), (work,))
    done = job.wait_exit(timeout_s)
    results = [job.read(f"result-{r}.json") for r in range(2)]
    errors = job.errors()
    job.kill()
    if not done or errors or None in results:
        raise AssertionError(f"job {name} failed: {errors or 'timeout'}")
    return results


def campaign(work: str, *, trials: int, seed: int, manifest_trials: int = 1) -> list[PeerTrial]:
    """`trials` damaged rank files (peer copies or originals), then `manifest_trials` damaged
    copies of the manifest on one node: the other node's intact copy serves step 3 itself."""
    rng = random.Random(seed)
    agent = Agent()
    out = []
    try:
        saved = _run(agent, save_steps, work, "save")
        digests = [{int(k): v for k, v in r.items()} for r in saved]
        nodes = {n: _step_dirs(os.path.join(work, "local", n)) for n in ("0", "1")}
        events = os.path.join(work, "persistent", "events.jsonl")
        for i in range(trials):
            node = rng.choice(("0", "1"))
            other = "1" if node == "0" else "0"
            peer_copy = f"rank-{int(other):05d}.safetensors"  # node n holds its ward's file
            own = f"rank-{int(node):05d}.safetensors"
            damage_peer = rng.random() < 0.6
            name = peer_copy if damage_peer else own
            path = os.path.join(nodes[node][3], name)
            m = random_mutation(
                rng, os.path.getsize(path), kinds=("flip", "flip", "zero", "truncate")
            )
            t = PeerTrial(
                file=f"node {node}/{name}", mutation=m, lost=f"node {other}" if damage_peer else ""
            )
            keep = Restorer()
            backup = os.path.join(work, "backup")
            lost_dir = os.path.join(work, "local", other)
            try:
                keep.damage(path, m)
                if damage_peer:  # the original's node is gone: the damaged copy is the only one
                    shutil.copytree(lost_dir, backup, symlinks=True)
                    shutil.rmtree(lost_dir)
                with open(events, "a"):
                    pass
                before = os.path.getsize(events)
                got = _run(agent, restore, work, f"restore-{i}")
                t.restored_step = got[0]["step"]
                if {g["step"] for g in got} != {2}:
                    t.problems.append(f"restored step(s) {[g['step'] for g in got]}, want 2")
                else:
                    t.bit_exact = all(g["digest"] == digests[r][2] for r, g in enumerate(got))
                    if not t.bit_exact:
                        t.problems.append("the restore of step 2 is not bit-exact")
                with open(events) as f:
                    f.seek(before)
                    new = [json.loads(x) for x in f if x.strip()]
                fb = [e for e in new if e.get("type") == "restore_fallback" and e.get("step") == 3]
                t.reason = fb[0]["reason"] if fb else ""
                if name not in t.reason:
                    t.problems.append(f"no restore_fallback event naming {name} (events: {new})")
            finally:
                keep.undo()
                if os.path.isdir(backup):
                    shutil.rmtree(lost_dir, ignore_errors=True)
                    shutil.move(backup, lost_dir)
            out.append(t)
        for i in range(manifest_trials):
            node = rng.choice(("0", "1"))
            path = os.path.join(nodes[node][3], "manifest.json")
            m = random_mutation(rng, os.path.getsize(path), kinds=("flip", "truncate", "zero"))
            t = PeerTrial(file=f"node {node}/manifest.json", mutation=m, lost="")
            keep = Restorer()
            try:
                keep.damage(path, m)
                got = _run(agent, restore, work, f"restore-manifest-{i}")
            finally:
                keep.undo()
            t.restored_step = got[0]["step"]
            t.bit_exact = all(g["digest"] == digests[r][3] for r, g in enumerate(got))
            if {g["step"] for g in got} != {3} or not t.bit_exact:
                t.problems.append(
                    f"restored step(s) {[g['step'] for g in got]} (bit-exact {t.bit_exact}); "
                    "want step 3 from the other node's intact manifest"
                )
            out.append(t)
    finally:
        agent.close()
    return out
