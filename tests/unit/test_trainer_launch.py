"""`elastickit train` builds the right torchrun command and rejects bad requests up front."""

from __future__ import annotations

import pytest
from elastickit.checkpoint.errors import RequestError

from elastickit.trainer.launch import TrainRequest, torchrun_command

pytestmark = pytest.mark.timeout(60)


def test_command_runs_the_worker_under_standalone_torchrun() -> None:
    cmd = torchrun_command(
        TrainRequest(layout="tp=2, dp=2", steps=5, ckpt="/c", every=2), python="py"
    )
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    assert cmd[6:8] == ["-m", "elastickit.trainer.worker"]
    flags = cmd[8:]
    assert flags[flags.index("--layout") + 1] == "dp=2,tp=2"
    assert flags[flags.index("--ckpt") + 1] == "/c" and flags[flags.index("--every") + 1] == "2"
    assert "--collective-monitor" not in flags


def test_monitor_defaults_on_with_faults() -> None:
    req = TrainRequest(layout="dp=2", inject=("crash:rank=1:step=3",))
    assert req.monitor_on() and not TrainRequest(layout="dp=2").monitor_on()
    assert not TrainRequest(layout="dp=2", events="e.jsonl", monitor=False).monitor_on()
    cmd = torchrun_command(req)
    assert cmd[cmd.index("--inject") + 1] == "crash:rank=1:step=3" and "--collective-monitor" in cmd


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (
            TrainRequest(layout="dp=2,tp=2", nproc=2),
            r"--nproc 2 does not match --layout dp=2,tp=2 \(4 ranks\)",
        ),
        (TrainRequest(layout="dp=2,xx=2"), r"--layout 'dp=2,xx=2': .*not one of pp, dp, tp"),
        (TrainRequest(model="huge"), r"--model 'huge' is unknown"),
    ],
)
def test_bad_requests_fail_before_launch(req: TrainRequest, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        torchrun_command(req)
