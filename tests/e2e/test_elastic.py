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
MICRO_BATCH = "4"  # half the default's microbatches per step: the same samples, less overhead
RTOL = 5e-5  # another layout sums in another order; a wrong restore is off by far more


# This 2-core machine is shared: a worker can be starved of the CPU for over a second. A hang
# timeout of 3 s (the default is 1 s) keeps such a worker from being taken for a hung one.
HANG_TIMEOUT = "3"


def _cmd(run, *args: str) -> list[str]:
    return [sys.executable, "-m", "elastickit.cli.main", "train", "--run", str(run), "--hang-timeout", HANG_TIMEOUT,
            "--micro-batch", MICRO_BATCH, *args]


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


def _ranks_by_generation(run) -> dict[int, dict[int, str]]:
    """ranks.jsonl (the monitor's per-rank step summaries): generation -> rank -> member."""
    out: dict[int, dict[int, str]] = {}
    with open(run / "ranks.jsonl") as f:
        for line in f:
            r = json.loads(line)
            assert r["step_time_s"] > 0 and r["num_ops"] > 0, r  # timed by the probes
            out.setdefault(r["gen"], {})[r["rank"]] = r["member"]
    return out


@pytest.mark.timeout(300)
def test_a_killed_node_costs_seconds_the_run_goes_on_at_a_new_layout_and_grows_back(tmp_path):
    """SIGKILL of a whole node at a random step; the node comes back as a spare and the job
    grows back onto it; ranks.jsonl has every generation's ranks."""
    seed = int.from_bytes(os.urandom(4), "little")
    step = random.Random(seed).randrange(2, 7)
    run = tmp_path / "run"
    # Room for the node to come back before the end: a new agent, a rendezvous round (its last
    # call waits 5 s) and a worker that imports torch take ~8 s on a quiet 2-core machine and
    # over 20 s on a loaded one, while steps take 0.1-0.3 s. Counting steps alone, the end raced
    # the rejoin (a CI run ended first); paced steps give it 30 s of wall time whatever the load.
    steps = 60
    p = subprocess.run(
        _cmd(run, "--nodes", "3", "--steps", str(steps), "--inject", f"killnode:node=1:step={step}",
             "--rejoin-after", "0", "--step-sleep", "0.5"),
        capture_output=True, text=True, timeout=280, env=_env(), check=False,
    )
    assert p.returncode == 0, f"seed {seed}, step {step}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    rows = _check_trajectory(run, steps)
    assert rows[0]["layout"] == "pp=1,dp=3,tp=1" and rows[0]["grad_accum"] == 2
    shrunk = [r for r in rows if r["world_size"] == 2]
    assert shrunk and shrunk[0]["layout"] == "pp=1,dp=2,tp=1" and shrunk[0]["grad_accum"] == 3  # the same batch
    assert rows[-1]["world_size"] == 3 and rows[-1]["grad_accum"] == 2  # grew back
    recs = _recoveries(run)
    assert [r["cause"] for r in recs] == ["killnode", "join"], recs
    rec, join = recs
    for r in recs:
        _check_phases(r)
    assert rec["node"] == 1 and rec["ranks"] == [1]
    assert (rec["old_layout"], rec["new_layout"], rec["world_size"]) == ("pp=1,dp=3,tp=1", "pp=1,dp=2,tp=1", 2)
    assert rec["restore"]["step"] <= step <= rec["restore"]["step"] + rec["lost_steps"] + 1
    assert join["node"] == 1 and join["world_size"] == 3 and join["time"] > rec["time"]
    assert "recovered from killnode of node 1" in p.stdout
    # The monitor ran in every generation; each line says which worker held the rank.
    gens = _ranks_by_generation(run)
    assert len(gens) == 3, gens
    first, shrunk_gen, grown = (gens[g] for g in sorted(gens))
    assert sorted(first) == [0, 1, 2] and sorted(shrunk_gen) == [0, 1] and sorted(grown) == [0, 1, 2]
    assert first[1] not in shrunk_gen.values()  # the killed worker is in no later generation
    assert first[1].split(".")[0] == "1" and set(grown.values()) - set(first.values())  # a fresh worker on node 1


@pytest.mark.timeout(300)
def test_a_hung_node_and_a_kill_9_of_a_node_group_from_outside(tmp_path):
    """A SIGSTOPped node is left out without waiting for a collective timeout; then a person
    kills another node's whole process group (nodes.json's pgid) from outside."""
    run = tmp_path / "run"
    steps = 20
    proc = subprocess.Popen(
        _cmd(run, "--nodes", "3", "--steps", str(steps), "--inject", "stopnode:node=2:step=4"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        deadline = time.monotonic() + 200
        while not (run / "steps.jsonl").exists() or len(_steps(run)) < 9:
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not train to step 9"
            time.sleep(0.2)
        node = json.loads((run / "nodes.json").read_text())["nodes"][1]
        os.killpg(node["pgid"], signal.SIGKILL)  # what a person does from outside
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    rows = _check_trajectory(run, steps)
    assert rows[-1]["world_size"] == 1 and rows[-1]["grad_accum"] == 6
    recs = _recoveries(run)
    assert [(r["cause"], r["node"]) for r in recs] == [("stopnode", 2), ("crash", 1)], recs
    for r in recs:
        _check_phases(r)
    assert recs[0]["new_layout"] == "pp=1,dp=2,tp=1" and recs[1]["new_layout"] == "pp=1,dp=1,tp=1"
    # The process group's own timeout is 60 s: a recovery far below it did not wait for one.
    assert recs[0]["mttr_s"] < 30
    nodes = {n["node"]: n for n in json.loads((run / "nodes.json").read_text())["nodes"]}
    assert nodes[2]["state"] == "fenced" and nodes[1]["state"] == "killed"
    assert all(_gone(w) for w in node["workers"]), "a worker outlived its agent (PR_SET_PDEATHSIG)"
    assert not (run / "local" / "node1").exists()  # the node's own storage went with it


@pytest.mark.timeout(240)
def test_a_hung_training_loop_in_a_live_process_is_found_by_its_progress(tmp_path):
    """The process lives and its heartbeat beats, but its training loop stopped: the ranks
    waiting on it leave it out within the hang timeout, and the recovery event names it."""
    seed = int.from_bytes(os.urandom(4), "little")
    step = random.Random(seed).randrange(3, 9)
    run = tmp_path / "run"
    steps = 14
    p = subprocess.run(
        _cmd(run, "--nodes", "3", "--steps", str(steps), "--inject", f"hang:rank=1:step={step}"),
        capture_output=True, text=True, timeout=220, env=_env(), check=False,
    )
    assert p.returncode == 0, f"seed {seed}, step {step}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    _check_trajectory(run, steps)
    recs = _recoveries(run)
    assert recs and recs[0]["cause"] == "hang", recs
    assert all(r["cause"] == "join" for r in recs[1:]), recs  # the fresh worker may join before the end
    rec = recs[0]
    _check_phases(rec)
    assert rec["node"] == 1 and rec["ranks"] == [1] and rec["new_layout"] == "pp=1,dp=2,tp=1"
    assert rec["stuck_members"] == rec["failed_members"] and rec["stuck_members"][0].startswith("1.")
    # Every rank finished step S-1 (it hung before step S's first collective): the lost work
    # is what the freshest complete checkpoint misses of it.
    assert rec["restore"]["step"] + rec["lost_steps"] == step - 1, rec
    # Detected by its progress, not by a collective's timeout (60 s) nor its heartbeat (it beat on).
    assert rec["phases"]["detect_s"] < 20, rec
    log = (run / "logs" / "node1.log").read_text()
    assert f"stops at step {step}" in log and "exiting so that its agent starts a fresh worker" in log


@pytest.mark.timeout(240)
def test_launch_on_every_node_with_the_store_outside_the_nodes_and_tp_kept(tmp_path):
    """`elastickit launch` as people run torchrun: a store process, then one launch per node,
    two workers each, `--layout tp=2`: losing a node keeps tp=2 and shrinks dp."""
    import socket

    from elastickit.elastic.rundir import read_recoveries

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    cli = [sys.executable, "-m", "elastickit.cli.main", "launch"]
    store = subprocess.Popen([*cli, "--store-only", "--rdzv-endpoint", endpoint], stdout=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    steps = 16
    nodes = []
    try:
        assert "rendezvous store serving" in store.stdout.readline()
        for j in range(2):
            env = {**_env(), "ELASTICKIT_LOCAL_TIER": str(tmp_path / "local" / f"node{j}")}
            # Into files, not pipes nobody reads while the job trains: a full pipe (64 KiB of
            # agent and worker logs) would block the node mid-step.
            log = open(tmp_path / f"node{j}.log", "w")  # noqa: SIM115 (the child keeps it)
            nodes.append(subprocess.Popen(
                [*cli, "--nnodes", "2:2", "--nproc-per-node", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "job1",
                 "--node", str(j), "--max-restarts", "0", "--", "--run", str(run), "--steps", str(steps),
                 "--layout", "tp=2", "--hang-timeout", HANG_TIMEOUT, "--micro-batch", MICRO_BATCH],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
            ))

        def logs() -> str:
            return "\n".join(f"--- node {j}:\n" + (tmp_path / f"node{j}.log").read_text()[-3000:] for j in range(2))

        deadline = time.monotonic() + 150
        while not (run / "steps.jsonl").exists() or len(_steps(run)) < 6:
            assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, "the job did not train\n" + logs()
            time.sleep(0.2)
        os.killpg(nodes[1].pid, signal.SIGKILL)  # node 1's launch process is its agent
        nodes[0].wait(timeout=180)
        assert nodes[0].returncode == 0, logs()
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
        store.terminate()
        store.wait(timeout=30)
    rows = _check_trajectory(run, steps)
    assert (rows[0]["layout"], rows[0]["grad_accum"]) == ("pp=1,dp=2,tp=2", 3)
    assert (rows[-1]["layout"], rows[-1]["grad_accum"]) == ("pp=1,dp=1,tp=2", 6)  # tp kept, dp shrunk
    recs = read_recoveries(str(run / "events.jsonl"))
    assert [(r["cause"], r["node"], r["ranks"], r["new_layout"]) for r in recs] == [
        ("crash", 1, [2, 3], "pp=1,dp=1,tp=2")
    ], recs
    _check_phases(recs[0])
