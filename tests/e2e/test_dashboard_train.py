"""A real `elastickit train` run with injected faults, then the dashboard's panels on its run
directory: what the monitor and the checkpoints recorded reaches every panel."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
EK = [sys.executable, "-m", "elastickit.cli.main"]


def test_a_crashed_training_run_on_the_dashboard(tmp_path) -> None:
    run = tmp_path / "run"
    train = subprocess.run(
        [*EK, "train", "--layout", "dp=2", "--nproc", "2", "--steps", "12", "--every", "4",
         "--ckpt", str(run / "ckpt"), "--events", str(run / "events.jsonl"),
         "--inject", "slow:rank=1:ms=80", "--inject", "crash:rank=1:step=10"],
        capture_output=True, text=True, timeout=240,
    )
    assert train.returncode != 0, train.stdout  # rank 1 crashed: today's job stops there
    top = subprocess.run([*EK, "top", str(run), "--json"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0, top.stderr
    d = json.loads(top.stdout)
    failure = next(i for i in d["incidents"]["incidents"] if i["kind"] == "failure")
    assert failure["cause"] == "crash" and failure["ranks"] == [1]
    assert failure["status"] == "not recovered" and failure["finding"]["evidence"]["process_exited"]
    assert d["job"]["health"] == "failing"
    assert d["heatmap"]["available"] and d["heatmap"]["ranks"] == [0, 1]
    assert d["heatmap"]["scores"]["1"] > d["heatmap"]["scores"]["0"]
    persistent = next(t for t in d["checkpoints"]["tiers"] if t["tier"] == "persistent")
    assert persistent["newest_step"] == 8 and persistent["on_disk"] == [4, 8]
    assert d["checkpoints"]["what_if"][-1]["step"] == 8
    assert {e["type"] for e in d["events"]["rows"]} >= {"crash", "checkpoint"}
