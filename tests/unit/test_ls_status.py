"""`elastickit ls` says what a checkpoint really is (issue 13 items 14 and 20): a missing or
wrong-sized file is not `complete`, reasons are shown whole, and saves the event log records as
skipped (superseded) are listed."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from elastickit.checkpoint.storage import files as writer_mod
from elastickit.checkpoint.tiers import Tiers
from typer.testing import CliRunner

import elastickit as ek
from elastickit.cli.main import app

pytestmark = pytest.mark.timeout(90)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _save(root, steps):
    m = torch.nn.Linear(4, 3)
    with ek.Checkpointer(str(root)) as ck:
        for s in steps:
            ck.save(s, {"model": m}).durable.result()


def test_a_missing_or_short_rank_file_is_not_complete(tmp_path):
    _save(tmp_path, (1, 2, 3))
    (tmp_path / "step-00000002" / "rank-00000.safetensors").unlink()
    f = tmp_path / "step-00000003" / "rank-00000.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    rows = json.loads(_run("ls", tmp_path, "--json").output)
    assert [(r["step"], r["status"]) for r in rows] == [(1, "complete"), (2, "incomplete"), (3, "damaged")]
    assert rows[1]["reason"] == (
        f"rank-00000.safetensors is missing; run elastickit verify {tmp_path / 'step-00000002'}"
    )
    assert rows[2]["reason"].startswith("rank-00000.safetensors has ")
    assert "bytes but the manifest says" in rows[2]["reason"]
    # verify agrees (exit 1)
    assert _run("verify", tmp_path / "step-00000002").exit_code == 1


def test_reasons_are_shown_whole(tmp_path):
    root = tmp_path / ("a-long-folder-name-" * 4)
    _save(root, (1,))
    (root / "step-00000001" / "manifest.json").write_text("{")
    res = _run("ls", root)
    assert res.exit_code == 0
    reason = json.loads(_run("ls", root, "--json").output)[0]["reason"]
    assert len(reason) > 150 and "is not valid JSON" in reason
    assert f"step 1 (persistent, unreadable): {reason}\n" in res.output  # one whole line


def test_superseded_saves_are_listed(tmp_path, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    real = writer_mod.write_file

    def gated(*a, **k):
        entered.set()
        gate.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(writer_mod, "write_file", gated)
    m = torch.nn.Linear(4, 3)
    ck = ek.Checkpointer(str(tmp_path), tiers=Tiers(host_buffers=3))
    for step in range(1, 7):
        ck.save(step, {"model": m})
        if step == 1:
            assert entered.wait(10)  # the tier is stuck writing step 1: 2..5 get superseded
    gate.set()
    ck.wait()
    ck.close()
    rows = json.loads(_run("ls", tmp_path, "--json").output)
    written = {r["step"] for r in rows if r["status"] == "complete"}
    skipped = {r["step"]: r for r in rows if r["status"] == "skipped"}
    assert skipped and set(skipped) | written == set(range(1, 7)) and not set(skipped) & written
    for step, r in skipped.items():
        assert r["tier"] == "persistent"
        assert r["reason"].startswith("superseded by step ") and r["reason"].endswith("(the tier was busy)")
    text = _run("ls", tmp_path).output
    step = min(skipped)
    assert f"step {step} (persistent, skipped): {skipped[step]['reason']}" in text
