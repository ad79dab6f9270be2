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


@pytest.mark.parametrize(
    ("req", "message"),
    [
        # the model's heads do not split over tp=3 (the workers failed in TP planning)
        (
            TrainRequest(layout="tp=3"),
            (
                r"^--layout tp=3: model tiny has 4 attention heads, 2 kv heads and 64 ffn units, "
                r"which do not split over tp=3; use tp=1 or 2$"
            ),
        ),
        (TrainRequest(layout="dp=2", inject=("garbage",)), r"^--inject 'garbage': unknown fault"),
        (
            TrainRequest(layout="dp=2", inject=("crash:rank=9:step=5",)),
            r"rank=9 is outside the world of 2 ranks; use 0\.\.1",
        ),
        (
            TrainRequest(pp_schedule="foo"),
            r"^--pp-schedule 'foo' is unknown; choose gpipe or 1f1b$",
        ),
        (TrainRequest(dp_mode="foo"), r"^--dp-mode 'foo' is unknown; choose fsdp or replicate$"),
        (
            TrainRequest(layout="dp=2,tp=2", dp_mode="replicate"),
            r"^--dp-mode replicate works without tp only",
        ),
        (TrainRequest(layout="pp=5"), r"model tiny has 4 layers, too few for pp=5 stages"),
        (TrainRequest(layout="dp=3"), r"does not split over dp=3; use dp=1, 2 or 4$"),
        (TrainRequest(extra_args=("--bogus",)), r"worker flags '--bogus': unrecognized"),
        # a fault that can never fire
        (
            TrainRequest(layout="dp=2", steps=4, inject=("crash:rank=1:step=500",)),
            r"step 500 is past --steps 4, so the fault would never fire; use a step from 1 to 4",
        ),
        (TrainRequest(inject=("crash:rank=0:step=0",)), r"steps are numbered from 1"),
        (
            TrainRequest(layout="dp=2", inject=("hang:rank=1:step=2",), monitor=False),
            r"needs the collective monitor .*; drop --no-monitor",
        ),
        # item 21: flags, not internal class names; singular rank
        (TrainRequest(layout="tp=0"), r"^--layout 'tp=0': tp=0: an axis needs at least 1 rank"),
        (TrainRequest(nproc=2), r"^--nproc 2 does not match --layout single \(1 rank\);"),
        (TrainRequest(inject=("slow:rank=1:ms=5",)), r"outside the world of 1 rank; use 0\.\.0"),
    ],
)
def test_every_option_is_checked_before_launch(req: TrainRequest, message: str) -> None:
    with pytest.raises(RequestError, match=message) as e:
        req.check()
    assert "TrainLayout" not in str(e.value) and "ModelConfig" not in str(e.value)
    assert "\n" not in str(e.value)


def test_good_requests_pass() -> None:
    for req in (
        TrainRequest(layout="dp=2,tp=2", inject=("crash:rank=3:step=20", "slow:rank=0:ms=5")),
        TrainRequest(layout="pp=2,tp=2", pp_schedule="1f1b"),
        TrainRequest(layout="dp=4", dp_mode="replicate", steps=3, every=1),
    ):
        req.check()


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real checkpoint root of the tiny model at step 2 (one process, the trainer's loop)."""
    from elastickit.trainer import TrainConfig, run_training

    root = str(tmp_path_factory.mktemp("tiny") / "ckpt")
    run_training(
        TrainConfig(model="tiny", steps=4, stop_after=2, seq_len=8, ckpt_dir=root, ckpt_every=2)
    )
    return root


def test_a_checkpoint_of_another_model_is_refused_from_its_manifest(tiny_root: str) -> None:
    from elastickit.trainer.model import CONFIGS
    from elastickit.trainer.preflight import model_tensors, newest_step

    step, entries, saved = newest_step(tiny_root)
    assert (step, saved) == (2, "tiny") and entries == model_tensors(CONFIGS["tiny"])
    assert TrainRequest(ckpt=tiny_root, steps=4).check_paths() == 2
    with pytest.raises(RequestError) as e:
        TrainRequest(model="tiny-moe", ckpt=tiny_root).check_paths()
    msg = str(e.value)
    assert msg.startswith(f"--ckpt {tiny_root}: its checkpoint of step 2 holds another model: ")
    assert "model/layers.0.feed_forward" in msg and msg.endswith(
        "pass --model tiny, or another --ckpt"
    )
    # Shapes too, not only names: the same names at another width.
    import dataclasses

    wide = dataclasses.replace(CONFIGS["tiny"], dim=64)
    from elastickit.trainer.preflight import check_checkpoint_model

    with pytest.raises(RequestError, match=r"model/\S+ is \[\d+(, \d+)*\] there but \[\d+"):
        check_checkpoint_model(tiny_root, "wide", model_tensors(wide))


def test_a_fault_before_the_resumed_step_is_refused(tiny_root: str) -> None:
    with pytest.raises(
        RequestError, match=r"resumes after step 2 .* so step 2 never runs; use a step from 3 to 4"
    ):
        TrainRequest(ckpt=tiny_root, steps=4, inject=("crash:rank=0:step=2",)).check_paths()
    TrainRequest(ckpt=tiny_root, steps=4, inject=("crash:rank=0:step=3",)).check_paths()


def test_a_checkpoint_root_that_cannot_be_written_is_refused(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RequestError, match=r"^--ckpt \S+/file is a file, not a directory"):
        TrainRequest(ckpt=str(blocker)).check_paths()
    with pytest.raises(
        RequestError, match=r"^--ckpt \S+/file/ckpt cannot be created: \S+/file is a file, not a directory"
    ):
        TrainRequest(ckpt=str(blocker / "ckpt")).check_paths()
    step_dir = tmp_path / "run" / "step-00000040"
    step_dir.mkdir(parents=True)
    with pytest.raises(RequestError, match=r"step-00000040 is one checkpoint \(step 40\), not a checkpoint root"):
        TrainRequest(ckpt=str(step_dir)).check_paths()
    fresh = tmp_path / "a" / "b"
    assert TrainRequest(ckpt=str(fresh)).check_paths() == 0
    assert fresh.is_dir() and not list(fresh.iterdir())  # the probe file is gone
