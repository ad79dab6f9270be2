"""The job panel's alerts on small hand-made logs: each fires on its condition and not without it."""

from __future__ import annotations

from elastickit.dashboard.incidents import incidents_panel
from elastickit.dashboard.job import job_panel
from elastickit.dashboard.logs import RunLogs

PHASES = {"detect_s": 0.5, "abort_s": 0.5, "rendezvous_s": 1.0, "start_s": 1.0, "restore_s": 0.5,
          "first_step_s": 0.5}


def _steps(n: int, t0: float = 1000.0) -> tuple[dict, ...]:
    return tuple({"step": i, "loss": 1.0, "world_size": 2, "layout": "dp=2", "grad_accum": 1,
                  "step_s": 1.0, "time": t0 + i} for i in range(1, n + 1))


def _recovery(t: float, restore_step: int, cause: str = "crash", ranks: tuple[int, ...] = (1,)) -> dict:
    return {"type": "recovery", "time": t, "cause": cause, "ranks": list(ranks), "node": 1, "phases": PHASES,
            "restore": {"tier": "persistent", "step": restore_step, "bytes": 10}, "lost_steps": 1,
            "old_layout": "dp=2", "new_layout": "dp=1", "world_size": 1}


def _checkpoint(t: float, step: int, status: str = "committed") -> dict:
    return {"type": "checkpoint", "time": t, "step": step, "blocking_s": 0.001, "bytes": 10,
            "tiers": {"persistent": {"status": status, "stored_bytes": 10, "persist_s": 0.1}}}


def _kinds(logs: RunLogs, current: int | None = None) -> list[str]:
    now = max([e["time"] for e in logs.events] + [s["time"] for s in logs.steps]) + 1
    return [a["kind"] for a in job_panel(logs, now=now, current=current)["alerts"]]


def test_a_healthy_run_has_no_alert() -> None:
    logs = RunLogs(steps=_steps(20), events=tuple(_checkpoint(1000 + s, s) for s in (10, 20)))
    assert _kinds(logs, 20) == []
    assert job_panel(logs, now=1021.0, current=20)["health"] == "healthy"


def test_restart_storm_needs_three_recoveries_within_ten_minutes() -> None:
    two = RunLogs(steps=_steps(5), events=(_recovery(1001, 1), _recovery(1002, 2)))
    assert "restart_storm" not in _kinds(two)
    three = RunLogs(steps=_steps(5), events=(_recovery(1001, 1), _recovery(1002, 2), _recovery(1003, 3)))
    assert "restart_storm" in _kinds(three)
    spread = RunLogs(steps=_steps(5), events=(_recovery(1, 1), _recovery(400, 2), _recovery(1003, 3)))
    assert "restart_storm" not in _kinds(spread)  # the first is 16 minutes before the newest record
    joins = RunLogs(steps=_steps(5), events=tuple(_recovery(1001 + i, i, "join") for i in range(3)))
    assert "restart_storm" not in _kinds(joins)  # nodes coming back are no failures


def test_no_checkpoint_progress_across_restarts_or_for_too_long() -> None:
    same = RunLogs(steps=_steps(5), events=(_recovery(1001, 4), _recovery(1003, 4)))
    assert "no_checkpoint_progress" in _kinds(same)
    moving = RunLogs(steps=_steps(5), events=(_recovery(1001, 4), _recovery(1003, 5)))
    assert "no_checkpoint_progress" not in _kinds(moving)
    # Two failures close together restore the same step, then the job saves again: it got past.
    past = RunLogs(steps=_steps(6), events=(_recovery(1001, 4), _recovery(1003, 4), _checkpoint(1005.5, 5)))
    assert "no_checkpoint_progress" not in _kinds(past, 6)
    before = RunLogs(steps=_steps(6), events=(_checkpoint(1000.5, 5), _recovery(1001, 4), _recovery(1003, 4)))
    assert "no_checkpoint_progress" in _kinds(before, 6)  # a save before the restarts does not count
    ckpts = tuple(_checkpoint(1000 + s, s) for s in (10, 20, 30))
    assert "no_checkpoint_progress" not in _kinds(RunLogs(steps=_steps(60), events=ckpts), 60)
    assert "no_checkpoint_progress" in _kinds(RunLogs(steps=_steps(70), events=ckpts), 70)
    failed = ckpts + (_checkpoint(1041, 40, "failed: disk full"),)
    assert "tier_failing" in _kinds(RunLogs(steps=_steps(41), events=failed), 41)


def test_a_crash_without_recovery_fails_the_job_until_steps_resume() -> None:
    crash = {"type": "crash", "ranks": [1], "step": 5, "time": 1005.5, "evidence": {"host": "h"}}
    down = RunLogs(steps=_steps(5), events=(crash,))
    panel = job_panel(down, now=1010.0, current=5)
    assert panel["health"] == "failing" and panel["alerts"][0]["kind"] == "failed"
    assert panel["since_failure_s"] == 4.5
    inc = incidents_panel(down)
    assert inc["num_unrecovered"] == 1 and inc["incidents"][0]["status"] == "not recovered"
    resumed = RunLogs(steps=_steps(8), events=(crash,))
    assert "failed" not in _kinds(resumed, 8)
    assert incidents_panel(resumed)["incidents"][0]["status"] == "recovered (no recovery record)"


def test_findings_after_a_failure_are_its_consequences() -> None:
    first = {"type": "crash", "ranks": [3], "step": 5, "time": 1005.0}
    then = {"type": "crash", "ranks": [2], "step": 5, "time": 1005.2}
    inc = incidents_panel(RunLogs(steps=_steps(4), events=(first, then, _recovery(1010, 4, ranks=(3,)))))
    assert len(inc["incidents"]) == 1
    only = inc["incidents"][0]
    assert only["ranks"] == [3] and only["node"] == 1 and only["finding"]["ranks"] == [3]
    assert [f["ranks"] for f in only["followed_by"]] == [[2]]
    assert only["status"] == "recovered"


def test_a_crash_is_told_at_the_recoverys_step_a_hang_at_the_monitors() -> None:
    """A crash finding carries the step of the rank's last heartbeat, which can lag the last
    step done: the summary names the recovery's account (restored step + steps redone). A hang
    finding names the step the rank stands in, and keeps it."""
    crash = {"type": "crash", "time": 1005.5, "ranks": [1], "step": 3, "evidence": {"process_exited": True}}
    logs = RunLogs(steps=_steps(8), events=(crash, {**_recovery(1007.0, 4), "cause": "killnode"}))
    (inc,) = incidents_panel(logs)["incidents"]
    assert inc["step"] == 3 and inc["after_step"] == 5
    assert inc["summary"].startswith("node 1 killed (SIGKILL): rank 1 after step 5;"), inc["summary"]
    hang = {**crash, "type": "hang", "step": 6, "op": "allreduce", "seq": 9}
    logs = RunLogs(steps=_steps(8), events=(hang, {**_recovery(1007.0, 4), "cause": "hang"}))
    (inc,) = incidents_panel(logs)["incidents"]
    assert inc["summary"].startswith("hang: rank 1 on node 1 at step 6 (never entered allreduce seq 9)"), inc["summary"]
