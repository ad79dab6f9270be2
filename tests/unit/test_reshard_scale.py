"""Huge target layouts (issue 13 item 10): refused past what the checkpoint can use, planned once
per distinct shard otherwise, with progress on long work."""

from __future__ import annotations

import io
import json

import pytest
import torch
from elastickit.checkpoint.format.directory import load_manifest
from elastickit.reshard import offline
from elastickit.reshard.layout import ParallelLayout
from elastickit.reshard.rules import RuleSet, rule, shard
from elastickit.virtual import save_virtual
from rich.console import Console
from typer.testing import CliRunner

from elastickit.cli import _console
from elastickit.cli.main import app

pytestmark = pytest.mark.timeout(120)

RULES = RuleSet((rule("model/w", shard(0, "tp")),))
W = torch.randn(128, 64)  # 8192 elements in all, with the norm below: 8256


@pytest.fixture()
def ck(tmp_path):
    lay = ParallelLayout(tp=2)
    states = [{"model/w": W.chunk(2)[r].clone(), "model/norm": torch.ones(64)} for r in range(2)]
    save_virtual(str(tmp_path / "s"), 3, lay, states, RULES)
    return str(tmp_path / "s")


def test_a_world_past_the_checkpoints_elements_is_refused_in_one_sentence(ck):
    res = CliRunner().invoke(app, ["reshard", ck, "--to", "dp=1000000", "--dry-run"])
    assert res.exit_code == 2
    assert res.output.strip() == (
        "error: the target layout dp=1000000 has 1,000,000 ranks, but the checkpoint holds only "
        "8,256 elements in all, so most ranks would hold nothing of it; choose a layout of at "
        "most 8,256 ranks"
    )


def test_ranks_that_only_replicate_share_one_plan(ck, monkeypatch):
    calls = []
    real = offline.target_tensors

    def counted(manifest, layout, rules, rank):
        calls.append(rank)
        return real(manifest, layout, rules, rank)

    monkeypatch.setattr(offline, "target_tensors", counted)
    seen = []
    plans = offline.plan_reshard(
        load_manifest(ck + "/step-00000003"), ParallelLayout(dp=4096, tp=2), RULES,
        on_progress=lambda phase, done, total: seen.append((phase, done, total)),
    )
    assert len(plans) == 8192 and calls == [0, 1]  # one plan per tp shard, not per rank
    assert plans[2].plan is plans[0].plan and plans[3].tensors is plans[1].tensors
    assert plans[8191].plan.bytes_needed == 64 * 64 * 4 + 64 * 4
    assert seen[-1] == ("planning", 8192, 8192) and len(seen) == 8192
    res = CliRunner().invoke(app, ["reshard", ck, "--to", "dp=4096,tp=2", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "(step 3, 2 ranks) -> dp=4096,tp=2 (8,192 ranks); dry run" in lines[0]
    assert lines[2].split()[:4] == ["4,096", "ranks", "tp=0", "2"]
    assert lines[3].split()[:4] == ["4,096", "ranks", "tp=1", "2"] and len(lines) == 4
    as_json = json.loads(
        CliRunner().invoke(app, ["reshard", ck, "--to", "dp=4096,tp=2", "--dry-run", "--json"]).output
    )
    assert len(as_json["ranks"]) == 8192


def test_long_work_shows_progress_on_a_terminal(ck, tmp_path, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(_console, "err", Console(file=buf, force_terminal=True, width=100))
    res = CliRunner().invoke(app, ["reshard", ck, str(tmp_path / "d"), "--to", "dp=3,tp=2"])
    assert res.exit_code == 0, res.output
    text = buf.getvalue()
    assert "planning" in text and "writing" in text and "6/6" in text
    buf.truncate(0)
    res = CliRunner().invoke(app, ["convert", ck, str(tmp_path / "v"), "--to", "dcp"])
    assert res.exit_code == 0, res.output
    assert "reading" in buf.getvalue() and "2/2" in buf.getvalue()
