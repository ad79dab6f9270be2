"""Every panel's data, from the recorded run (tests/fixtures/dashboard: a slow rank, a slow link,
a crash of rank 3 on node 1 restored from peer copies, a rejoin). The assertions are what the
injected faults imply, so a re-recorded run passes them too."""

from __future__ import annotations

import pathlib

import pytest
from elastickit.dashboard.checkpoints import checkpoints_panel
from elastickit.dashboard.curves import curves_panel
from elastickit.dashboard.events import events_panel
from elastickit.dashboard.goodput import goodput
from elastickit.dashboard.heatmap import heatmap_panel
from elastickit.dashboard.incidents import incidents_panel
from elastickit.dashboard.job import job_panel
from elastickit.dashboard.links import links_panel
from elastickit.dashboard.logs import RunSources, load_run
from elastickit.dashboard.records import current_step
from elastickit.dashboard.recovery_point import scan_tiers
from elastickit.dashboard.summary import PANELS, summarize

RUN = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "dashboard" / "run"


@pytest.fixture(scope="module")
def logs():
    return load_run(RunSources.from_run_dir(str(RUN)))


def _now(logs) -> float:
    return max(e["time"] for e in logs.events) + 60.0


def test_the_fixture_is_what_the_recorder_says(logs) -> None:
    types = {e["type"] for e in logs.events}
    assert {"slow_rank", "slow_link", "crash", "checkpoint", "restore", "recovery"} <= types
    assert logs.bad_lines == ()
    assert len(logs.steps) > 40  # steps replayed after each restore appear again


def test_heatmap_marks_the_slow_rank_with_its_straggler_score(logs) -> None:
    hm = heatmap_panel(logs)
    assert hm["available"] and hm["ranks"] == [0, 1, 2, 3]
    assert hm["slow"] == [1]
    assert hm["scores"]["1"] >= hm["threshold"] > max(hm["scores"][r] for r in ("0", "2", "3"))
    # Three incarnations; the restart after the crash replays a step (it appears twice).
    assert sorted(set(hm["segments"])) == [0, 1, 2]
    assert len(hm["steps"]) == len(hm["segments"]) == len(hm["busy_s"][0])
    assert len(hm["steps"]) > len(set(hm["steps"]))
    # While node 1 was gone, ranks 2 and 3 have no cells.
    gone = [j for j, seg in enumerate(hm["segments"]) if seg == 1]
    assert all(hm["busy_s"][2][j] is None and hm["busy_s"][3][j] is None for j in gone)
    # The others wait for the slow rank longer than for anyone else in most steps.
    last = [j for j, seg in enumerate(hm["segments"]) if seg == 2]
    wins = sum(hm["held_s"][1][j] >= max(hm["held_s"][r][j] for r in (0, 2, 3)) for j in last)
    assert wins > len(last) // 2


def test_links_mark_the_slow_pair_only(logs) -> None:
    lk = links_panel(logs)
    assert lk["available"] and lk["ranks"] == [0, 1, 2, 3]
    assert lk["slow"] == [[0, 2]]
    m = lk["matrix"]
    pair = {(a, b): min(m[a][b], m[b][a]) for a, b in ((0, 1), (0, 2), (1, 3), (2, 3))}
    others = sorted(v for k, v in pair.items() if k != (0, 2))
    assert pair[(0, 2)] >= 3 * others[1]  # the detector's rule: 3x the median of the other pairs
    assert lk["kind"][0][2] == "p2p" and lk["kind"][0][1] == "group"
    slow_groups = [g["ranks"] for g in lk["groups"] if g["slow"]]
    assert slow_groups == [[0, 2]]
    floor = {tuple(g["ranks"]): g["op_s"] for g in lk["groups"]}
    assert floor[(0, 2)] > 2 * floor[(1, 3)]  # the pipeline pair over the slow link vs the other


def test_incident_names_the_crashed_rank_its_node_and_the_cost_by_phase(logs) -> None:
    inc = incidents_panel(logs)
    assert inc["num_failures"] == 1 and inc["num_unrecovered"] == 0
    crash = next(i for i in inc["incidents"] if i["kind"] == "failure")
    assert crash["cause"] == "crash" and crash["ranks"] == [3] and crash["node"] == 1
    assert crash["finding"]["type"] == "crash" and crash["finding"]["evidence"]["process_exited"] is True
    rec = crash["recovery"]
    assert [p["phase"] for p in rec["phases"]] == inc["phases"]
    assert rec["restore"]["tier"] == "peer" and rec["restore"]["step"] == 12
    assert rec["old_layout"] == "pp=2,dp=2,tp=1" and rec["new_layout"] == "pp=2,dp=1,tp=1"
    assert rec["lost_steps"] >= 1 and rec["lost_work_s"] > 0
    assert crash["cost_s"] == pytest.approx(sum(p["s"] for p in rec["phases"]), abs=0.01)
    assert crash["cost_s"] == pytest.approx(rec["downtime_s"] + rec["lost_work_s"], abs=0.01)
    assert "rank 3 on node 1" in crash["summary"]
    join = next(i for i in inc["incidents"] if i["kind"] == "join")
    assert join["node"] == 1 and join["recovery"]["new_layout"] == "pp=2,dp=2,tp=1"
    assert [i["id"] for i in inc["incidents"]] == [2, 1]  # newest first


def test_checkpoints_per_tier_and_the_what_if_for_every_node(logs) -> None:
    contents = scan_tiers(logs.sources, logs.nodes)
    ck = checkpoints_panel(logs, contents, now=_now(logs), current_step=40)
    tiers = {t["tier"]: t for t in ck["tiers"]}
    assert set(tiers) == {"local", "peer", "persistent"}
    assert tiers["persistent"]["newest_step"] == 40 and tiers["persistent"]["at_risk_steps"] == 0
    assert tiers["persistent"]["on_disk"] == [32, 36, 40]  # keep_last=3
    assert tiers["local"]["on_disk"] == {"0": [36, 40], "1": [36, 40]}
    assert tiers["persistent"]["throughput_bps"] > 0 and tiers["persistent"]["compression_ratio"]
    assert tiers["persistent"]["age_s"] == pytest.approx(_now(logs) - tiers["persistent"]["newest_time"])
    rows = {w["node"]: w for w in ck["what_if"]}
    assert rows[0]["step"] == 40 and rows[0]["tier"] == "peer" and rows[0]["from_nodes"] == [1]
    assert rows[1]["step"] == 40 and rows[1]["tier"] == "peer" and rows[1]["from_nodes"] == [0]
    assert rows["all"]["tier"] == "persistent" and rows["all"]["step"] == 40
    assert rows[0]["text"] == "if node 0 died now, the run would restore step 40 from the node-local tier on node 1, node 0's shards from their peer copies"
    assert [r["step"] for r in ck["restores"]] == [12, 24]


def test_curves_one_series_per_incarnation_and_restart_markers(logs) -> None:
    cv = curves_panel(logs)
    assert len(cv["series"]) == 3
    assert [m["cause"] for m in cv["markers"]] == ["crash", "join"]
    assert [m["step"] for m in cv["markers"]] == [12, 24]
    assert cv["series"][1][0]["step"] == 13 and cv["series"][2][0]["step"] == 25
    assert cv["series"][-1][-1]["step"] == 40
    assert all(p["loss"] is not None for s in cv["series"] for p in s)
    thin = curves_panel(logs, max_points=10)
    assert thin["stride"] > 1 and sum(len(s) for s in thin["series"]) <= 10 + 3
    assert thin["series"][-1][-1]["step"] == 40  # the newest point is always kept


def test_events_filter_by_type_and_rank(logs) -> None:
    ev = events_panel(logs)
    assert ev["total"] == len(logs.events) == len(ev["rows"])
    assert ev["rows"][0]["time"] >= ev["rows"][-1]["time"]  # newest first
    assert {"crash", "recovery", "checkpoint"} <= set(ev["types"])
    crash = events_panel(logs, type="crash")
    assert [r["ranks"] for r in crash["rows"]] == [[3]]
    assert "rank 3 crashed" in crash["rows"][0]["text"]
    by_rank = events_panel(logs, rank=1)
    assert by_rank["rows"] and all(1 in r["ranks"] for r in by_rank["rows"])


def test_goodput_accounts_for_the_wall_time(logs) -> None:
    gp = goodput(logs)
    assert 0 < gp["ettr"] < 1
    parts = gp["productive_s"] + sum(gp["badput_s"].values())
    assert parts == pytest.approx(gp["wall_s"], rel=0.01)
    assert gp["badput_s"]["recovery"] > 0 and gp["badput_s"]["lost_work"] > 0
    assert gp["ettr"] == pytest.approx(gp["productive_s"] / gp["wall_s"], abs=1e-3)


def test_job_panel_says_what_runs_and_what_is_wrong(logs) -> None:
    now = _now(logs)
    job = job_panel(logs, now=now, current=current_step(logs.steps))
    assert job["step"] == 40 and job["layout"] == "pp=2,dp=2" and job["world_size"] == 4
    assert job["step_rate"] > 0 and job["step_s"] > 0
    assert job["health"] == "degraded"
    assert [a["kind"] for a in job["alerts"]] == ["slow_rank"] and "rank 1" in job["alerts"][0]["text"]
    crash = next(e for e in logs.events if e["type"] == "crash")
    assert job["since_failure_s"] == pytest.approx(now - crash["time"], abs=1.0)
    assert job["active"] is False  # nothing written for a minute


def test_summarize_has_every_panel(logs) -> None:
    out = summarize(logs, scan_tiers(logs.sources, logs.nodes), now=_now(logs))
    assert set(PANELS) <= set(out) and out["meta"]["live"] is False
