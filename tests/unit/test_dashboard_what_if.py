"""The what-if follows the tiers' contents exactly as a restore by the survivors would: take
files away from the recorded run's tier directories and the answer changes accordingly."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
from elastickit.dashboard.logs import RunSources
from elastickit.dashboard.recovery_point import TierContents, scan_tiers, what_if

RUN = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "dashboard" / "run"
NODES = (
    {"node": 0, "state": "running", "local": "local/node-0"},
    {"node": 1, "state": "running", "local": "local/node-1"},
)


@pytest.fixture
def run(tmp_path) -> pathlib.Path:
    dst = tmp_path / "run"
    shutil.copytree(RUN, dst)
    return dst


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
    assert (rows[0]["step"], rows[0]["tier"], rows[0]["from_nodes"]) == (40, "peer", [1])
    assert (rows[1]["step"], rows[1]["tier"], rows[1]["from_nodes"]) == (40, "peer", [0])
    assert rows["all"]["tier"] == "persistent" and rows[0]["lost_steps"] == 0


def test_a_survivor_missing_the_newest_step_falls_back_to_an_older_local_one(run) -> None:
    _rm(run / "local" / "node-1" / "step-00000040")
    _rm(run / "ckpt" / "step-00000040")
    rows = _rows(run)
    # Node 0 lost: node 1 holds step 36 complete (its shards and node 0's copies).
    assert (rows[0]["step"], rows[0]["tier"]) == (36, "peer") and rows[0]["lost_steps"] == 4
    # Node 1 lost: it held no step 40 any more, so node 0's own directory serves it.
    assert (rows[1]["step"], rows[1]["tier"], rows[1]["from_nodes"]) == (40, "local", [0])


def test_without_peer_copies_a_lost_node_means_the_persistent_tier(run) -> None:
    for step in ("00000036", "00000040"):
        for rank in (2, 3):  # node 1's shards, copied onto node 0
            _rm(run / "local" / "node-0" / f"step-{step}" / f"rank-{rank:05d}.safetensors")
    rows = _rows(run)
    assert (rows[1]["step"], rows[1]["tier"]) == (40, "persistent")
    assert (rows[0]["step"], rows[0]["tier"]) == (40, "peer")  # node 1 still holds node 0's copies


def test_a_copy_of_the_wrong_size_does_not_count(run) -> None:
    for rank in (2, 3):
        with open(run / "local" / "node-0" / "step-00000040" / f"rank-{rank:05d}.safetensors", "ab") as f:
            f.write(b"x")  # torn or foreign: the manifest's size no longer matches
    rows = _rows(run)
    # Step 40 is no longer complete without node 1: the persistent tier's 40 beats local 36.
    assert (rows[1]["step"], rows[1]["tier"]) == (40, "persistent")
    _rm(run / "ckpt" / "step-00000040")
    rows = _rows(run)
    assert (rows[1]["step"], rows[1]["tier"]) == (36, "peer")


def test_nothing_left_anywhere_says_the_run_starts_over(run) -> None:
    _rm(run / "ckpt")
    _rm(run / "local" / "node-1")
    rows = _rows(run)
    assert rows[0]["step"] is None and "start over" in rows[0]["text"]
    assert rows[1]["tier"] == "local" and rows[1]["step"] == 40  # node 0 has all four files itself
    assert rows["all"]["step"] is None


def test_a_node_that_is_down_is_reported_not_asked(run) -> None:
    nodes = ({**NODES[0]}, {**NODES[1], "state": "killed"})
    rows = _rows(run, nodes)
    assert rows[1]["step"] is None and rows[1]["text"] == "node 1 is killed"
    # With node 1 already gone, losing node 0 leaves only the persistent tier.
    assert (rows[0]["step"], rows[0]["tier"]) == (40, "persistent")


def test_without_nodes_only_the_persistent_tier_is_known() -> None:
    rows = what_if(TierContents(persistent_steps=(8, 16)), 20)
    assert rows == [{"node": "all", "state": "", "step": 16, "tier": "persistent", "from_nodes": [],
                     "lost_steps": 4,
                     "text": "if this job died now, the run would restore step 16 from the persistent tier"}]
