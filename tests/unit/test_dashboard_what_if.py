"""The what-if follows the tiers' contents exactly as a restore by the survivors would: take
files away from the recorded run's tier directories and the answer changes accordingly.

The recorded run (tests/fixtures/dashboard) ended at dp=2 on nodes 0 and 3: each node's local
tier (`local/node<n>/run-<key>/`) holds steps 39 and 40, its own rank file and the peer copy of
the other's; the persistent tier holds step 40."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
from elastickit.checkpoint.runs import existing_run_key
from elastickit.dashboard.logs import RunSources
from elastickit.dashboard.recovery_point import TierContents, scan_tiers, what_if

RUN = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "dashboard" / "run"
NODES = (
    {"node": 0, "state": "running", "local": "local/node0"},
    {"node": 3, "state": "running", "local": "local/node3"},
)


@pytest.fixture
def run(tmp_path) -> pathlib.Path:
    dst = tmp_path / "run"
    shutil.copytree(RUN, dst)
    return dst


def _step(run: pathlib.Path, node: int, step: int) -> pathlib.Path:
    (mine,) = (run / "local" / f"node{node}").glob("run-*")
    return mine / f"step-{step:08d}"


def _rows(run: pathlib.Path, nodes=NODES) -> dict:
    contents = scan_tiers(RunSources.from_run_dir(str(run)), nodes)
    return {r["node"]: r for r in what_if(contents, 40)}


def _rm(path: pathlib.Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        os.remove(path)


def test_each_node_lost_alone_restores_from_the_peer_copies_on_the_other(run) -> None:
    rows = _rows(run)
    assert (rows[0]["step"], rows[0]["tier"], rows[0]["from_nodes"]) == (40, "peer", [3])
    assert (rows[3]["step"], rows[3]["tier"], rows[3]["from_nodes"]) == (40, "peer", [0])
    assert rows["all"]["tier"] == "persistent" and rows[0]["lost_steps"] == 0


def test_a_survivor_missing_the_newest_step_falls_back_to_an_older_local_one(run) -> None:
    _rm(_step(run, 3, 40))
    _rm(run / "ckpt" / "step-00000040")
    rows = _rows(run)
    # Node 0 lost: node 3 holds step 39 complete (its shard and node 0's copy).
    assert (rows[0]["step"], rows[0]["tier"]) == (39, "peer") and rows[0]["lost_steps"] == 1
    # Node 3 lost: it held no step 40 any more, so node 0's own directory serves it.
    assert (rows[3]["step"], rows[3]["tier"], rows[3]["from_nodes"]) == (40, "local", [0])


def test_without_peer_copies_a_lost_node_means_the_persistent_tier(run) -> None:
    for step in (39, 40):
        _rm(_step(run, 0, step) / "rank-00001.safetensors")  # node 3's shard, copied onto node 0
    rows = _rows(run)
    assert (rows[3]["step"], rows[3]["tier"]) == (40, "persistent")
    assert (rows[0]["step"], rows[0]["tier"]) == (40, "peer")  # node 3 still holds node 0's copy


def test_a_copy_of_the_wrong_size_does_not_count(run) -> None:
    with open(_step(run, 0, 40) / "rank-00001.safetensors", "ab") as f:
        f.write(b"x")  # torn or foreign: the manifest's size no longer matches
    rows = _rows(run)
    # Step 40 is no longer complete without node 3: the persistent tier's 40 beats local 39.
    assert (rows[3]["step"], rows[3]["tier"]) == (40, "persistent")
    _rm(run / "ckpt" / "step-00000040")
    rows = _rows(run)
    assert (rows[3]["step"], rows[3]["tier"]) == (39, "peer")


def test_nothing_left_anywhere_says_the_run_starts_over(run) -> None:
    _rm(run / "ckpt")
    _rm(run / "local" / "node3")
    rows = _rows(run)
    assert rows[0]["step"] is None and "start over" in rows[0]["text"]
    assert rows[3]["tier"] == "local" and rows[3]["step"] == 40  # node 0 has both files itself
    assert rows["all"]["step"] is None


def test_a_node_that_is_down_is_reported_not_asked(run) -> None:
    nodes = ({**NODES[0]}, {**NODES[1], "state": "killed"})
    rows = _rows(run, nodes)
    assert rows[3]["step"] is None and rows[3]["text"] == "node 3 is killed"
    # With node 3 already gone, losing node 0 leaves only the persistent tier.
    assert (rows[0]["step"], rows[0]["tier"]) == (40, "persistent")


def _other_run(run: pathlib.Path, node: int, root: str) -> None:
    """Another run's node-local directory on the node, holding a complete step 40."""
    other = run / "local" / f"node{node}" / "run-0123456789abcdef"
    shutil.copytree(_step(run, node, 40).parent, other)
    (other / "run.json").write_text(json.dumps({"key": "0123456789abcdef", "root": root}))


def test_only_this_runs_node_local_directory_is_read(run) -> None:
    mine = _step(run, 3, 40).parent
    _other_run(run, 3, "/elsewhere/ckpt")  # another job on the same node's storage
    _rm(mine / "step-00000040")
    _rm(run / "ckpt" / "step-00000040")
    # Named by this run's key (the run id in the persistent root and the root's real path), as
    # a Checkpointer of this run writes it.
    key = existing_run_key(str(run / "ckpt"))
    assert key and not mine.name.endswith(key)  # recorded elsewhere: the key was another
    mine.rename(mine.parent / f"run-{key}")
    rows = _rows(run)
    assert (rows[0]["step"], rows[0]["tier"]) == (39, "peer")  # not the other run's step 40
    # Named by neither key nor root: with two runs on the node, none is taken for this one.
    (mine.parent / f"run-{key}").rename(mine)
    rows = _rows(run)
    assert rows[0]["step"] is None and "start over" in rows[0]["text"]
    # Its run.json names this root: that one.
    info = json.loads((mine / "run.json").read_text())
    (mine / "run.json").write_text(json.dumps({**info, "root": os.path.realpath(run / "ckpt")}))
    rows = _rows(run)
    assert (rows[0]["step"], rows[0]["tier"]) == (39, "peer")


def test_a_moved_run_directory_keeps_its_node_local_tiers(run) -> None:
    # The fixture was recorded in another directory: neither the key nor run.json's root match
    # here, and each node's directory holds one run, inside the run directory: that one.
    info = json.loads((_step(run, 0, 40).parent / "run.json").read_text())
    assert info["root"] != os.path.realpath(run / "ckpt")
    assert _rows(run)[3]["tier"] == "peer"
    # The same node directory outside the run directory is not assumed to be this run's.
    outside = run.parent / "elsewhere-node3"
    shutil.move(str(run / "local" / "node3"), outside)
    rows = _rows(run, (NODES[0], {**NODES[1], "local": str(outside)}))
    assert rows[0]["step"] == 40 and rows[0]["tier"] == "persistent"


def test_without_nodes_only_the_persistent_tier_is_known() -> None:
    rows = what_if(TierContents(persistent_steps=(8, 16)), 20)
    assert rows == [{"node": "all", "state": "", "step": 16, "tier": "persistent", "from_nodes": [],
                     "lost_steps": 4,
                     "text": "if this job died now, the run would restore step 16 from the persistent tier"}]
