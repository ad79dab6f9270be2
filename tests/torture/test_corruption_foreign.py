"""Damaged DeepSpeed, DCP and Hugging Face safetensors checkpoints through `elastickit convert`
(issue 17, item 2; CI subset of `benchmarks/torture.py`): one sentence, never a traceback, and a
wrong tensor only where the format has no checksum to tell (`foreign.UNPROTECTED`)."""

import os

import pytest

from tests.torture import foreign

SEED = int(os.environ.get("EK_TORTURE_SEED", "17"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_damaged_foreign_checkpoints_get_one_sentence_never_a_silent_wrong_tensor(tmp_path):
    report = foreign.campaign(str(tmp_path), trials=90, seed=SEED)
    broken = report.broken()
    assert not broken, "\n".join(broken)
    table = report.table()
    assert {k[0] for k in table} == set(foreign.FORMATS)
    silent = {k: row["silent"] for k, row in table.items() if row["silent"]}
    assert set(silent) <= set(foreign.UNPROTECTED), f"wrong tensors loaded silently: {silent}"
    # Where the format has a checksum, damage to the tensor files was caught every time it mattered.
    for key in (("deepspeed", "*_optim_states.pt"), ("dcp", ".distcp")):
        row = table.get(key)
        assert row and row["detected"] > 0 and row["silent"] == 0, (key, row)
