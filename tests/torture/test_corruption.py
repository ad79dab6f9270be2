"""Corruption everywhere (issue 17, item 2; CI subset of `benchmarks/torture.py`).

Our format: every damaged byte, truncation or deletion in a rank file (plain or zstd), a manifest
or a node-local file is detected by `elastickit verify` (exit 1, naming the file), and a restore
falls back to the previous checkpoint, bit-exact, with a `restore_fallback` event naming the file.
The same for peer copies, with two real ranks. Foreign formats: see test_corruption_foreign.py.
"""

import os

import pytest

from tests.torture import corruption, peers

SEED = int(os.environ.get("EK_TORTURE_SEED", "17"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_our_format_detects_every_damage_and_restore_falls_back(tmp_path):
    report = corruption.ours_campaign(str(tmp_path), trials=60, seed=SEED)
    assert not report.failures, "\n".join(report.failures)
    table = report.table()
    # Every variant's manifest and rank files were hit, and every damage was caught.
    assert {k[0] for k in table} == set(corruption.VARIANTS)
    assert {k[1] for k in table} >= {"manifest", "safetensors", "safetensors.zst"}
    for key, row in table.items():
        assert row["detected"] == row["trials"] == row["fell_back"], (key, row)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_damaged_peer_copies_are_caught_and_restore_falls_back(tmp_path):
    trials = peers.campaign(str(tmp_path), trials=3, seed=SEED)
    problems = [
        f"{t.file} ({t.mutation.describe()}, lost {t.lost or 'nothing'}): {p}"
        for t in trials
        for p in t.problems
    ]
    assert not problems, "\n".join(problems)
    files = [t for t in trials if not t.file.endswith("manifest.json")]
    assert all(t.restored_step == 2 and t.bit_exact for t in files)
    # At least one trial damaged a peer copy while the original's node was gone.
    assert any(t.lost for t in files)
    # A damaged copy of the manifest on one node: the other node's copy serves step 3 whole.
    assert [t.restored_step for t in trials if t.file.endswith("manifest.json")] == [3]
