"""Load (issue 17, item 5; CI version of `benchmarks/torture.py --only load`): four real ranks
saving every step through memory, node-local with peer copies and persistent tiers for about
half a minute: RSS and descriptors flat after warm-up, no deadlock, every save in the event log
with what became of it on each tier, and the last step committed by close()."""

import pytest

from tests.torture import load

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(300)]


def test_every_step_saved_by_four_ranks_stays_flat_and_accounted_for(tmp_path):
    rep = load.run(str(tmp_path), world=4, duration_s=25)
    assert not rep.problems, "\n".join(rep.problems)
    assert rep.steps > 20
    assert sum(rep.checkpoints.values()) >= rep.steps
    assert rep.checkpoints.get("persistent committed", 0) > 0
