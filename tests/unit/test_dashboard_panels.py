"""Every panel's data, from the recorded run (tests/fixtures/dashboard, recorded by record.py
there from two real `elastickit train` runs): 4 simulated nodes, node 1 killed (SIGKILL) after
step 12 and node 2 hung (SIGSTOP) after step 26, each recovered in-process on the survivors;
before it, in the same run directory, a 4-rank pp=2,dp=2 job with rank 1 slow and the link
0 -> 2 slow (the per-rank step summaries: elastic workers do not write ranks.jsonl yet).
The assertions are what the injected faults imply, checked against the run's own records."""

from __future__ import annotations

import dataclasses
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


def _steps(logs) -> list[dict]:
    return [dict(s) for s in logs.steps]


def test_the_fixture_is_what_the_recorder_says(logs) -> None:
    types = [e["type"] for e in logs.events]
    assert {"slow_rank", "slow_link", "checkpoint", "restore", "recovery"} <= set(types)
    assert logs.bad_lines == ()
    recs = [e for e in logs.events if e["type"] == "recovery"]
    assert [(r["cause"], r["node"]) for r in recs] == [("killnode", 1), ("stopnode", 2)]
    # Steps redone after each restore appear again: 40 steps, 43 lines.
    assert len(logs.steps) == 40 + sum(r["lost_steps"] for r in recs)
    assert [n["state"] for n in logs.nodes] == ["done", "done", "failed", "done"]


def test_heatmap_marks_the_slow_rank_with_its_straggler_score(logs) -> None:
    hm = heatmap_panel(logs)
    assert hm["available"] and hm["ranks"] == [0, 1, 2, 3]
    assert hm["slow"] == [1]
    assert hm["scores"]["1"] >= hm["threshold"] > max(hm["scores"][r] for r in ("0", "2", "3"))
    # The job that wrote ranks.jsonl ran 12 steps at one layout: one incarnation.
    assert hm["steps"] == list(range(1, 13)) and set(hm["segments"]) == {0}
    assert len(hm["steps"]) == len(hm["segments"]) == len(hm["busy_s"][0])
    # The others wait for the slow rank longer than for anyone else in most steps.
    cols = range(1, len(hm["steps"]))  # step 1 is the warm-up
    wins = sum(hm["held_s"][1][j] >= max(hm["held_s"][r][j] for r in (0, 2, 3)) for j in cols)
    assert wins > len(cols) // 2


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


def test_incidents_name_the_killed_and_the_hung_node_and_the_cost_by_phase(logs) -> None:
    inc = incidents_panel(logs)
    assert inc["num_failures"] == 2 and inc["num_unrecovered"] == 0
    assert [i["id"] for i in inc["incidents"]] == [2, 1]  # newest first
    hung, killed = inc["incidents"]
    # Killed: node 1 (its worker was rank 1 of 4), after step 12 as injected.
    assert (killed["kind"], killed["cause"], killed["node"], killed["ranks"]) == ("failure", "killnode", 1, [1])
    assert killed["after_step"] == 12 and killed["status"] == "recovered"
    assert killed["summary"].startswith("node 1 killed (SIGKILL): rank 1 after step 12; pp=1,dp=4,tp=1 -> pp=1,dp=3,tp=1")
    # Hung: node 2, whose worker was rank 1 of the 3 left, after step 26 as injected.
    assert (hung["cause"], hung["node"], hung["ranks"], hung["after_step"]) == ("stopnode", 2, [1], 26)
    assert hung["summary"].startswith("node 2 hung (SIGSTOP): rank 1 after step 26")
    steps = _steps(logs)
    for i, (rec, nodes) in enumerate(zip(
            (killed["recovery"], hung["recovery"]), ((4, 3), (3, 2)), strict=True)):
        assert [p["phase"] for p in rec["phases"]] == inc["phases"]
        assert (rec["old_layout"], rec["new_layout"]) == (f"pp=1,dp={nodes[0]},tp=1", f"pp=1,dp={nodes[1]},tp=1")
        # The node took part in the restored checkpoint: its shards come from peer copies.
        assert rec["restore"]["tier"] == "peer"
        assert rec["restore"]["step"] + rec["lost_steps"] == inc["incidents"][1 - i]["after_step"]
        cost = inc["incidents"][1 - i]["cost_s"]
        assert cost == pytest.approx(sum(p["s"] for p in rec["phases"]), abs=0.01)
        assert cost == pytest.approx(rec["downtime_s"] + rec["lost_work_s"], abs=0.01)
        # The steps redone: the first step after the restore is the restored one plus one, at the
        # new world size.
        first = next(s for s in steps if s["time"] > rec["time"] - rec["downtime_s"] and s["world_size"] == nodes[1])
        assert first["step"] == rec["restore"]["step"] + 1
    # A hang is found by silence: detection is most of its cost, unlike a kill's.
    detect = {i["cause"]: i["recovery"]["phases"][0] for i in (killed, hung)}
    assert detect["stopnode"]["phase"] == "detect" and detect["stopnode"]["s"] > 3 * detect["killnode"]["s"]


def test_checkpoints_per_tier_and_the_what_if_for_every_node(logs) -> None:
    contents = scan_tiers(logs.sources, logs.nodes)
    ck = checkpoints_panel(logs, contents, now=_now(logs), current_step=40)
    tiers = {t["tier"]: t for t in ck["tiers"]}
    assert set(tiers) == {"local", "peer", "persistent"}
    assert tiers["persistent"]["newest_step"] == 40 and tiers["persistent"]["at_risk_steps"] == 0
    assert tiers["persistent"]["on_disk"] == [40]  # the recorder kept the newest only
    # The survivors' node-local tiers (this run's run-<key> directory), as retention left them.
    assert tiers["local"]["on_disk"] == {"0": [39, 40], "1": [], "2": [], "3": [39, 40]}
    assert tiers["persistent"]["throughput_bps"] > 0 and tiers["persistent"]["compression_ratio"]
    assert tiers["persistent"]["age_s"] == pytest.approx(_now(logs) - tiers["persistent"]["newest_time"])
    # Saves in flight when a node died did not commit: the records say so.
    assert tiers["local"]["failed"] >= 1 and "did not reach" in tiers["local"]["last_failure"]
    rows = {w["node"]: w for w in ck["what_if"]}
    # dp=2 on nodes 0 and 3 at the end: each holds its own shard and a peer copy of the other's.
    assert (rows[0]["step"], rows[0]["tier"], rows[0]["from_nodes"]) == (40, "peer", [3])
    assert (rows[3]["step"], rows[3]["tier"], rows[3]["from_nodes"]) == (40, "peer", [0])
    # Node 1 came back as a spare after its kill and holds nothing: losing it costs nothing.
    assert (rows[1]["step"], rows[1]["tier"], rows[1]["from_nodes"]) == (40, "local", [0, 3])
    assert rows[2]["step"] is None and rows[2]["text"] == "node 2 is failed"
    assert rows["all"]["tier"] == "persistent" and rows["all"]["step"] == 40
    assert rows[0]["text"] == ("if node 0 were lost now, the run would restore step 40 from the node-local "
                               "tier on node 3, node 0's shards from their peer copies")
    assert [r["step"] for r in ck["restores"]] == [11, 24]


def test_curves_one_series_per_incarnation_and_restart_markers(logs) -> None:
    cv = curves_panel(logs)
    assert len(cv["series"]) == 3
    assert [m["cause"] for m in cv["markers"]] == ["killnode", "stopnode"]
    assert [m["step"] for m in cv["markers"]] == [11, 24]
    assert cv["series"][1][0]["step"] == 12 and cv["series"][2][0]["step"] == 25
    assert cv["series"][0][-1]["step"] == 12 and cv["series"][1][-1]["step"] == 26
    assert cv["series"][-1][-1]["step"] == 40
    assert all(p["loss"] is not None for s in cv["series"] for p in s)
    thin = curves_panel(logs, max_points=10)
    assert thin["stride"] > 1 and sum(len(s) for s in thin["series"]) <= 10 + 3
    assert thin["series"][-1][-1]["step"] == 40  # the newest point is always kept


def test_events_filter_by_type_and_rank(logs) -> None:
    ev = events_panel(logs)
    assert ev["total"] == len(logs.events) == len(ev["rows"])
    assert ev["rows"][0]["time"] >= ev["rows"][-1]["time"]  # newest first
    assert {"slow_rank", "slow_link", "recovery", "checkpoint"} <= set(ev["types"])
    recs = events_panel(logs, type="recovery")
    assert [r["ranks"] for r in recs["rows"]] == [[1], [1]]
    slow = events_panel(logs, type="slow_link")
    assert [r["ranks"] for r in slow["rows"]] == [[0, 2]]
    by_rank = events_panel(logs, rank=2)
    assert [r["type"] for r in by_rank["rows"]] == ["slow_link"]


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
    assert job["step"] == 40 and job["layout"] == "pp=1,dp=2,tp=1" and job["world_size"] == 2
    assert job["step_rate"] > 0 and job["step_s"] > 0
    assert job["health"] == "degraded"
    assert [a["kind"] for a in job["alerts"]] == ["slow_rank"] and "rank 1" in job["alerts"][0]["text"]
    # The last failure: node 2 stopped after step 26 (its recovery's time less its downtime).
    hung = [e for e in logs.events if e["type"] == "recovery"][-1]
    step26 = max(s["time"] for s in _steps(logs) if s["step"] == 26 and s["world_size"] == 3)
    assert job["since_failure_s"] == pytest.approx(now - (hung["time"] - hung["mttr_s"]), abs=0.01)
    assert step26 <= now - job["since_failure_s"] < hung["time"]
    assert job["active"] is False  # nothing written for a minute
    # Every agent exited; node 2, back as a spare waiting to join, exited with an error when
    # the job ended (its rendezvous closed): the run still finished.
    assert job["finished"] is True
    waiting = dataclasses.replace(logs, nodes=(*logs.nodes[:3], {**logs.nodes[3], "state": "rejoining"}))
    assert job_panel(waiting, now=now, current=40)["finished"] is False


def test_summarize_has_every_panel(logs) -> None:
    out = summarize(logs, scan_tiers(logs.sources, logs.nodes), now=_now(logs))
    assert set(PANELS) <= set(out) and out["meta"]["live"] is False
