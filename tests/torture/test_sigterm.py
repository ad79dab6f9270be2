"""SIGTERM, a scheduler's preemption notice (issue 17, item 6; CI subset of
`benchmarks/torture.py --only sigterm`): two real ranks saving every 7th step get SIGTERM at
random instants (both ranks, one of them, both a moment apart); the step saved is the last step
trained, durable and bit-exact, and the ranks exit within the grace period."""

import os

import pytest

from tests.torture import sigterm

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(400)]

SEED = int(os.environ.get("EK_TORTURE_SEED", "17"))


def test_sigterm_saves_the_last_step_trained(tmp_path):
    rep = sigterm.campaign(str(tmp_path), count=len(sigterm.HOWS), seed=SEED)
    assert not rep.failures, "\n".join(rep.failures)
    assert all(t.saved == t.trained for t in rep.trials)
    # The saved step is not a due one in most trials: SIGTERM, not the policy, saved it.
    assert any(t.saved % sigterm.EVERY for t in rep.trials)
