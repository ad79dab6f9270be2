"""Elastic recovery end to end: real torchrun agents (one per simulated node), real SIGKILL and
SIGSTOP of a whole node, in-process recovery at a new layout, and the run directory's files.

Every run is checked against the same training without failures (one process, the same global
batch): losses equal up to the reduction order of another layout, every global sample consumed
exactly once in the final trajectory, and the recovery events' phases present and consistent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

GLOBAL_BATCH = 24
RTOL = 5e-5  # another layout sums in another order; a wrong restore is off by far more


def _cmd(run, *args: str) -> list[str]:
    return [sys.executable, "-m", "elastickit.cli.main", "train", "--run", str(run), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _steps(run) -> list[dict]:
    from elastickit.elastic.rundir import read_steps

    return read_steps(str(run))


def _recoveries(run) -> list[dict]:
    from elastickit.elastic.rundir import read_recoveries

    return read_recoveries(os.path.join(run, "events.jsonl"))


def _reference(steps: int) -> list[float]:
    """The uninterrupted run: one process, the same global batch (one microbatch)."""
    from elastickit.demo import reference_losses

    return reference_losses(steps, GLOBAL_BATCH)


def _check_trajectory(run, steps: int) -> list[dict]:
    rows = _steps(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "a step is missing from steps.jsonl"
    # Each global sample exactly once: the final trajectory's steps tile [0, steps * batch).
    assert [tuple(r["samples"]) for r in rows] == [
        (i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH) for i in range(steps)
    ]
    ref = _reference(steps)
    for r in rows:
        want = ref[r["step"] - 1]
        assert abs(r["loss"] - want) <= RTOL * abs(want), (
            f"step {r['step']} ({r['layout']}): loss {r['loss']} differs from the uninterrupted run's {want}"
        )
    return rows


def _check_phases(rec: dict) -> None:
    phases = rec["phases"]
    assert set(phases) == {"detect_s", "abort_s", "rendezvous_s", "start_s", "restore_s", "first_step_s"}
    assert all(v >= 0 for v in phases.values()), phases
    assert abs(sum(phases.values()) - rec["mttr_s"]) < 1e-2, rec
    assert rec["restore"]["tier"] in ("memory", "local", "peer", "persistent")
    assert rec["restore"]["bytes"] > 0
    assert rec["lost_steps"] >= 0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.timeout(240)
def test_a_killed_node_costs_seconds_and_the_run_goes_on_at_a_new_layout(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    step = random.Random(seed).randrange(4, 14)
    run = tmp_path / "run"
    steps = 24
    p = subprocess.run(
        _cmd(run, "--nodes", "3", "--steps", str(steps), "--inject", f"killnode:node=1:step={step}"),
        capture_output=True, text=True, timeout=220, env=_env(), check=False,
    )
    assert p.returncode == 0, f"seed {seed}, step {step}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    rows = _check_trajectory(run, steps)
    assert rows[0]["layout"] == "pp=1,dp=3,tp=1" and rows[0]["grad_accum"] == 4
    assert rows[-1]["layout"] == "pp=1,dp=2,tp=1" and rows[-1]["grad_accum"] == 6  # the same batch
    recs = [r for r in _recoveries(run) if r["cause"] == "killnode"]
    assert len(recs) == 1, _recoveries(run)
    rec = recs[0]
    _check_phases(rec)
    assert rec["node"] == 1 and rec["ranks"] == [1]
    assert (rec["old_layout"], rec["new_layout"], rec["world_size"]) == ("pp=1,dp=3,tp=1", "pp=1,dp=2,tp=1", 2)
    assert rec["restore"]["step"] <= step <= rec["restore"]["step"] + rec["lost_steps"] + 1
    nodes = {n["node"]: n for n in json.loads((run / "nodes.json").read_text())["nodes"]}
    assert nodes[1]["state"] == "killed"
    assert nodes[1]["workers"] and all(_gone(w) for w in nodes[1]["workers"]), "a worker outlived its node"
    assert not (run / "local" / "node1").exists()  # the node's own storage went with it
    assert "recovered from killnode of node 1" in p.stdout


@pytest.mark.timeout(300)
def test_kill_9_of_a_node_group_from_outside_then_the_node_rejoins_and_the_job_grows_back(tmp_path):
    run = tmp_path / "run"
    steps = 150
    proc = subprocess.Popen(
        _cmd(run, "--nodes", "3", "--steps", str(steps), "--rejoin-after", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "steps.jsonl").exists() or len(_steps(run)) < 6:
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        node = json.loads((run / "nodes.json").read_text())["nodes"][1]
        os.killpg(node["pgid"], signal.SIGKILL)  # what a person does from outside
        out, err = proc.communicate(timeout=270)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    rows = _check_trajectory(run, steps)
    recs = _recoveries(run)
    crash = [r for r in recs if r["cause"] == "crash" and r["node"] == 1]
    join = [r for r in recs if r["cause"] == "join" and r["node"] == 1]
    assert crash and join, recs
    for r in (crash[0], join[0]):
        _check_phases(r)
    assert join[0]["time"] > crash[0]["time"] and join[0]["world_size"] == 3
    worlds = [r["world_size"] for r in rows]
    assert 2 in worlds and worlds[-1] == 3, worlds  # shrank, then grew back
    assert all(_gone(w) for w in node["workers"]), "a worker outlived its agent (PR_SET_PDEATHSIG)"


@pytest.mark.timeout(240)
def test_a_hung_node_is_left_out_without_waiting_for_a_collective_timeout(tmp_path):
    run = tmp_path / "run"
    steps = 20
    p = subprocess.run(
        _cmd(run, "--nodes", "3", "--steps", str(steps), "--inject", "stopnode:node=2:step=6"),
        capture_output=True, text=True, timeout=220, env=_env(), check=False,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_trajectory(run, steps)
    recs = [r for r in _recoveries(run) if r["cause"] == "stopnode"]
    assert len(recs) == 1, _recoveries(run)
    _check_phases(recs[0])
    assert recs[0]["node"] == 2 and recs[0]["new_layout"] == "pp=1,dp=2,tp=1"
    # The process group's own timeout is 60 s: a recovery far below it did not wait for one.
    assert recs[0]["mttr_s"] < 30
    nodes = {n["node"]: n for n in json.loads((run / "nodes.json").read_text())["nodes"]}
    assert nodes[2]["state"] == "fenced"


@pytest.mark.timeout(240)
def test_launch_on_every_node_with_the_store_outside_the_nodes(tmp_path):
    """`elastickit launch` as people run torchrun: a store process, then one launch per node."""
    import socket

    from elastickit.elastic.rundir import read_recoveries

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    cli = [sys.executable, "-m", "elastickit.cli.main", "launch"]
    store = subprocess.Popen([*cli, "--store-only", "--rdzv-endpoint", endpoint], stdout=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    steps = 30
    nodes = []
    try:
        assert "rendezvous store serving" in store.stdout.readline()
        for j in range(3):
            env = {**_env(), "ELASTICKIT_LOCAL_TIER": str(tmp_path / "local" / f"node{j}")}
            nodes.append(subprocess.Popen(
                [*cli, "--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", "job1",
                 "--node", str(j), "--max-restarts", "0", "--", "--run", str(run), "--steps", str(steps)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
            ))
        deadline = time.monotonic() + 150
        while not (run / "steps.jsonl").exists() or len(_steps(run)) < 8:
            assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, "the job did not train"
            time.sleep(0.2)
        os.killpg(nodes[2].pid, signal.SIGKILL)  # node 2's launch process is its agent
        outs = [n.communicate(timeout=180) for n in nodes[:2]]
        for n, (out, err) in zip(nodes[:2], outs, strict=True):
            assert n.returncode == 0, out[-2000:] + err[-3000:]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
        store.terminate()
        store.wait(timeout=30)
    _check_trajectory(run, steps)
    recs = read_recoveries(str(run / "events.jsonl"))
    assert [(r["cause"], r["node"], r["new_layout"]) for r in recs] == [("crash", 2, "pp=1,dp=2,tp=1")], recs
    _check_phases(recs[0])
