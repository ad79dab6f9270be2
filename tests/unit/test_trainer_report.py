"""What `elastickit train` says after its job: one line on what happened, one on resuming, and
the checkpoints (superseded ones included) from the files the job left behind."""

from __future__ import annotations

import signal

import pytest
import torch
from elastickit.checkpoint.events import read_events
from elastickit.checkpoint.tiers import Tiers, TierSpec

import elastickit as ek
from elastickit.trainer.report import (
    checkpoint_lines,
    compact_steps,
    failure_line,
    resume_line,
    worker_errors,
)

pytestmark = pytest.mark.timeout(120)

# torchrun's own report, as it appears in the job's log (torch 2.13).
TORCHRUN_TAIL = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
elastickit.trainer.worker FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-01_01:44:36
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 7920)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_01:44:36
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 13 (pid: 7921)
  error_file: <N/A>
============================================================
"""


def test_compact_steps() -> None:
    assert compact_steps([8, 2, 4, 5, 6, 10, 2]) == "2, 4-6, 8, 10"
    assert compact_steps([]) == ""


def test_superseded_checkpoints_are_reported(tmp_path) -> None:
    # A tier that rests long after its first write supersedes the saves made meanwhile; close()
    # writes the newest at once. The records are the real Checkpointer's.
    root = str(tmp_path / "ck")
    ck = ek.Checkpointer(root, every=1, tiers=Tiers(persistent=TierSpec(max_busy_fraction=1e-4)))
    m = torch.nn.Linear(8, 8)
    for step in range(1, 6):
        ck.save(step, {"model": m})
    ck.close()
    records = read_events(f"{root}/events.jsonl")
    superseded = sorted(r["step"] for r in records if r.get("skipped_tiers"))
    assert superseded and 5 not in superseded
    lines = checkpoint_lines(records, root)
    committed = sorted(set(range(1, 6)) - set(superseded))
    assert (
        lines[0]
        == f"checkpoints: step{'s' * (len(committed) > 1)} {compact_steps(committed)} committed in {root}"
    )
    assert lines[1].startswith(
        f"checkpoints superseded on the persistent tier: step{'s' * (len(superseded) > 1)} "
        f"{compact_steps(superseded)} (the tier was busy"
    )
    assert len(lines) == 2


def test_failed_and_skipped_checkpoints_are_reported() -> None:
    records = [
        {"type": "checkpoint", "step": 2, "tiers": {"persistent": {"status": "committed"}}},
        {
            "type": "checkpoint",
            "step": 4,
            "tiers": {"persistent": {"status": "failed: [Errno 28] No space left on device"}},
        },
        {
            "type": "checkpoint_skipped",
            "step": 6,
            "skipped_tiers": {"all": "no host buffer is free"},
        },
        {"type": "crash", "ranks": [1], "step": 5},
    ]
    assert checkpoint_lines(records, "R") == [
        "checkpoints: step 2 committed in R",
        "checkpoint 6 skipped: no host buffer is free",
        "checkpoint 4 failed on the persistent tier: [Errno 28] No space left on device",
    ]


def test_one_line_says_what_happened() -> None:
    crash = {"type": "crash", "ranks": [1], "step": 5, "op": "", "time": 1.0}
    hang = {"type": "hang", "ranks": [0], "step": 7, "op": "all_reduce", "time": 2.0}
    common = {"returncode": 1, "stopped_by": None, "log_text": TORCHRUN_TAIL, "world_size": 2}
    assert failure_line(events=[hang, crash], inject=("crash:rank=1:step=5",), **common) == (
        "rank 1 crashed at step 5: its process exited (injected by --inject crash:rank=1:step=5)"
    )
    assert failure_line(events=[hang], **common) == (
        "rank 0 hung at step 7: the others waited in all_reduce for it, and the job was stopped"
    )
    # The monitor missed it (torchrun stopped rank 0 first): the fault's announcement says it.
    announced = "elastickit.faults: crash:rank=1:step=5: crashing at step 5\n" + TORCHRUN_TAIL
    assert failure_line(
        **{**common, "log_text": announced}, events=[], inject=("crash:rank=1:step=5",)
    ) == ("rank 1 crashed at step 5: its process exited (injected by --inject crash:rank=1:step=5)")
    # No monitor: torchrun's root cause.
    assert failure_line(events=[], **common) == "rank 1 exited with code 13"
    # The workers' own sentences win over torchrun's report, one line for every rank.
    text = "error (rank 0): --ckpt x: bad\nerror (rank 1): --ckpt x: bad\n" + TORCHRUN_TAIL
    assert worker_errors(text) == {"--ckpt x: bad": [0, 1]}
    assert failure_line(**{**common, "log_text": text}, events=[]) == "--ckpt x: bad (every rank)"
    assert failure_line(**{**common, "stopped_by": int(signal.SIGINT)}, events=[crash]) == (
        "interrupted (SIGINT): stopped the training job and its 2 ranks"
    )
    assert failure_line(**{**common, "log_text": "", "returncode": 7}, events=[]) == (
        "the training job failed (torchrun exit code 7)"
    )


def test_how_to_resume() -> None:
    assert resume_line(ckpt="R", last_step=4, inject=(), log_path="R/train.log") == (
        "last checkpoint: step 4 in R; run the same command to resume (details: R/train.log)"
    )
    # The injected crash would fire again on a rerun.
    assert "run the same command without --inject to resume" in resume_line(
        ckpt="R", last_step=4, inject=("crash:rank=1:step=5",), log_path="L"
    )
    assert resume_line(ckpt="R", last_step=None, inject=(), log_path="L").startswith(
        "no checkpoint was committed in R yet; the same command starts over"
    )
    assert resume_line(ckpt=None, last_step=None, inject=(), log_path="L").startswith(
        "no checkpoints were kept (no --ckpt)"
    )
