"""Incidents: each failure with its attribution and the whole cost of getting back, by phase.

A failure is the monitor's first `crash` or `hang` finding; findings after it and before its
recovery (ranks torn down with the job) are its consequences, listed, not new incidents. Its
recovery is the next `recovery` event. The cost is every phase of the recovery (detect, abort,
rendezvous, worker start, restore, first step) plus the lost work: the steps since the
restored checkpoint, which the job runs again, at the median step time before the failure. A
recovery the monitor saw no failure for (a node killed with the monitor off) is an incident of
its own; a join (a node coming back) is shown as a layout change with its cost.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .logs import RunLogs
from .records import FAILURE_TYPES, PHASES, Recovery, final_steps, number, parse_all

# Findings this soon after an incident's first one, with no recovery in between, belong to it.
CONSEQUENCE_S = 60.0


def _finding(e: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": e.get("type"),
        "time": e.get("time"),
        "ranks": list(e.get("ranks", [])),
        "step": e.get("step"),
        "op": e.get("op", ""),
        "group": e.get("group", ""),
        "seq": e.get("seq", -1),
        "evidence": e.get("evidence", {}),
        "confidence": e.get("confidence"),
    }


def _step_time_before(steps: Sequence[Mapping[str, Any]], t: float) -> float | None:
    times = [
        v for line in final_steps([s for s in steps if s["time"] <= t]).values()
        if (v := number(line, "step_s")) is not None
    ]
    return statistics.median(times[-50:]) if times else None


def incidents_panel(logs: RunLogs) -> dict[str, Any]:
    """Every incident, newest first, and totals (count, median time to recover, total cost)."""
    recoveries, bad = parse_all(logs.events, "recovery", Recovery.from_dict)
    recoveries.sort(key=lambda r: r.time)
    findings = [e for e in logs.events if e.get("type") in FAILURE_TYPES]
    groups: list[list[Mapping[str, Any]]] = []
    for e in findings:
        t = float(e["time"])
        if groups:
            first = float(groups[-1][0]["time"])
            recovered_between = any(first <= r.time - r.downtime_s <= t or first <= r.time <= t
                                    for r in recoveries if r.is_failure)
            if t - first <= CONSEQUENCE_S and not recovered_between:
                groups[-1].append(e)
                continue
        groups.append([e])
    incidents: list[dict[str, Any]] = []
    unmatched = list(range(len(groups)))
    for r in recoveries:
        match = None
        if r.is_failure:
            before = [i for i in unmatched if float(groups[i][0]["time"]) <= r.time]
            if before:
                match = before[-1]
                unmatched.remove(match)
        incidents.append(_incident(groups[match] if match is not None else [], r, logs))
    for i in unmatched:
        incidents.append(_incident(groups[i], None, logs))
    incidents.sort(key=lambda x: x["time"], reverse=True)
    for n, inc in enumerate(sorted(incidents, key=lambda x: x["time"]), start=1):
        inc["id"] = n
    failures = [i for i in incidents if i["kind"] == "failure"]
    downtimes = [i["recovery"]["downtime_s"] for i in failures if i["recovery"]]
    return {
        "incidents": incidents,
        "phases": [p.removesuffix("_s") for p in PHASES] + ["lost_work"],
        "num_failures": len(failures),
        "num_unrecovered": sum(1 for i in failures if i["status"] == "not recovered"),
        "mttr_s": round(statistics.median(downtimes), 3) if downtimes else None,
        "total_cost_s": round(sum(i["cost_s"] for i in incidents), 3),
        "bad_records": bad,
    }


def _incident(group: list[Mapping[str, Any]], r: Recovery | None, logs: RunLogs) -> dict[str, Any]:
    first = group[0] if group else None
    if first is not None:
        t = float(first["time"])
    else:
        assert r is not None
        t = r.time - r.downtime_s
    evidence = first.get("evidence", {}) if first is not None else {}
    ranks = list(r.ranks) if r is not None and r.ranks else list(first.get("ranks", [])) if first else []
    node = r.node if r is not None else None
    recovery = None
    cost = 0.0
    if r is not None:
        step_s = _step_time_before(logs.steps, t)
        lost_work = r.lost_steps * step_s if step_s is not None else 0.0
        bars = [{"phase": p.removesuffix("_s"), "s": round(s, 3)} for p, s in r.phases]
        bars.append({"phase": "lost_work", "s": round(lost_work, 3)})
        cost = r.downtime_s + lost_work
        recovery = {
            "time": r.time,
            "cause": r.cause,
            "phases": bars,
            "downtime_s": round(r.downtime_s, 3),
            "lost_steps": r.lost_steps,
            "lost_work_s": round(lost_work, 3),
            "restore": {"tier": r.restore_tier, "step": r.restore_step, "bytes": r.restore_bytes},
            "old_layout": r.old_layout,
            "new_layout": r.new_layout,
            "world_size": r.world_size,
        }
    if r is not None:
        status = "recovered"
    elif any(s["time"] > t for s in logs.steps):
        status = "recovered (no recovery record)"
    else:
        status = "not recovered"
    kind = "join" if r is not None and not r.is_failure else "failure"
    cause = r.cause if r is not None else str(first.get("type")) if first else ""
    # The recovery's own account of when: the last step done before the failure is the restored
    # one plus the steps redone.
    after = (r.restore_step + r.lost_steps if r is not None and r.is_failure
             and r.restore_step is not None else None)
    return {
        "time": t,
        "kind": kind,
        "cause": cause,
        "ranks": ranks,
        "node": node,
        "host": evidence.get("host") if isinstance(evidence, dict) else None,
        "step": first.get("step") if first is not None else None,
        "after_step": after,
        "finding": _finding(first) if first is not None else None,
        "followed_by": [_finding(e) for e in group[1:]],
        "status": status,
        "recovery": recovery,
        "cost_s": round(cost, 3),
        "summary": _summary(kind, cause, ranks, node, first, r, after),
    }


# How a node fault injected from outside (`elastickit train --inject killnode|stopnode`) reads.
NODE_CAUSES = {"killnode": "killed (SIGKILL)", "stopnode": "hung (SIGSTOP)"}


def _summary(kind: str, cause: str, ranks: list[int], node: int | None,
             first: Mapping[str, Any] | None, r: Recovery | None, after: int | None) -> str:
    who = f"rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks))}" if ranks else "a rank"
    where = f" on node {node}" if node is not None else ""
    if kind == "join":
        text = f"node {node} joined ({who})" if node is not None else f"{who} joined"
    else:
        step = first.get("step") if first is not None else None
        if cause in NODE_CAUSES and node is not None:
            text = f"node {node} {NODE_CAUSES[cause]}: {who}"
        else:
            text = f"{cause}: {who}{where}"
        # A hang finding names the step the rank stands in; a crash finding only the step of the
        # rank's last heartbeat, which can lag a step behind (or run one ahead of) the last step
        # done, so the recovery's account wins there.
        if isinstance(step, int) and (after is None or first is not None and first.get("type") == "hang"):
            text += f" at step {step}"
        elif after is not None:
            text += f" after step {after}"
        if first is not None and first.get("type") == "hang" and first.get("op"):
            text += f" (never entered {first['op']} seq {first.get('seq')})"
    if r is not None and r.old_layout and r.new_layout and r.old_layout != r.new_layout:
        text += f"; {r.old_layout} -> {r.new_layout}"
    return text
