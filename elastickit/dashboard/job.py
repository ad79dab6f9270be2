"""The job panel: is the job healthy? Step, layout, world size, step rate, ETTR, time since
the last failure, nodes, ranks (live heartbeats with --store), and alerts:

- failing: a failure with no recovery and no step since;
- restart storm: `STORM_COUNT` or more recoveries from failures within `STORM_WINDOW_S`;
- no checkpoint progress: two recoveries in a row restored the same step (nvrx-watch's alert),
  or the newest committed checkpoint is more than `STALE_FACTOR` checkpoint intervals old;
- a rank getting slower: its straggler score over the last steps is past the detector's
  threshold and higher than over the steps before;
- a tier failing or saves skipped; log lines that could not be read.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from elastickit.monitor.detector import DetectorConfig, straggler_scores

from .goodput import goodput
from .logs import RunLogs
from .records import FAILURE_TYPES, CheckpointRecord, Recovery, number, parse_all
from .windows import columns, complete, latest_segment

STORM_COUNT = 3
STORM_WINDOW_S = 600.0
STALE_FACTOR = 3
SLOWER_STEPS = 10
SILENT_S = 5.0


def _alert(level: str, kind: str, text: str) -> dict[str, str]:
    return {"level": level, "kind": kind, "text": text}


def _slower_ranks(logs: RunLogs, recoveries: Sequence[Recovery]) -> list[dict[str, str]]:
    steps = complete(latest_segment(columns(logs.summaries, recoveries)))
    if len(steps) < 2:
        return []
    recent = straggler_scores(steps[-SLOWER_STEPS:])
    before = straggler_scores(steps[-2 * SLOWER_STEPS : -SLOWER_STEPS]) if len(steps) > SLOWER_STEPS else {}
    threshold = DetectorConfig().slow_rank_min_gap
    out = []
    for rank, score in sorted(recent.items()):
        if score < threshold:
            continue
        was = before.get(rank)
        trend = f", up from {was:.2f}" if was is not None and score > was else ""
        out.append(_alert("warning", "slow_rank",
                          f"rank {rank} is slowing the job: straggler score {score:.2f} over the "
                          f"last {min(len(steps), SLOWER_STEPS)} steps{trend} (others wait on it)"))
    return out


def _checkpoint_alerts(records: Sequence[CheckpointRecord], recoveries: Sequence[Recovery],
                       step: int | None) -> list[dict[str, str]]:
    out = []
    failed = [r for r in recoveries if r.is_failure]
    # Restarts that keep restoring the same step (nvrx-watch's signal): the job dies before it
    # saves again. A checkpoint committed after the last of them shows it got past that point.
    if len(failed) >= 2 and failed[-1].restore_step is not None and (
        failed[-1].restore_step == failed[-2].restore_step
    ) and not any(r.time > failed[-1].time and r.step > failed[-1].restore_step
                  and any(t.committed for t in r.tiers) for r in records):
        out.append(_alert("critical", "no_checkpoint_progress",
                          f"the last two recoveries both restored step {failed[-1].restore_step}: "
                          "no checkpoint progress across restarts"))
    committed = sorted({r.step for r in records if any(t.committed for t in r.tiers)})
    if committed and step is not None:
        gaps = [b - a for a, b in itertools.pairwise(committed)]
        interval = statistics.median(gaps) if gaps else committed[0]
        behind = step - committed[-1]
        if interval > 0 and behind > STALE_FACTOR * interval:
            out.append(_alert("warning", "no_checkpoint_progress",
                              f"the newest committed checkpoint (step {committed[-1]}) is {behind} "
                              f"steps old, more than {STALE_FACTOR} intervals of {interval:g} steps"))
    recent = records[-10:]
    failing = sorted({t.tier for r in recent for t in r.tiers if t.failed})
    if failing:
        out.append(_alert("warning", "tier_failing", f"tier {', '.join(failing)} failed in recent saves"))
    return out


def job_panel(logs: RunLogs, *, now: float, live: Sequence[dict[str, Any]] | None = None,
              current: int | None = None) -> dict[str, Any]:
    """The job's state at `now`. `live`: per-rank heartbeats from the job's store, if any."""
    recoveries, _ = parse_all(logs.events, "recovery", Recovery.from_dict)
    recoveries.sort(key=lambda r: r.time)
    records, _ = parse_all(logs.events, "checkpoint", CheckpointRecord.from_dict)
    last = logs.steps[-1] if logs.steps else {}
    world = last.get("world_size")
    if world is None and logs.summaries:
        cols = latest_segment(columns(logs.summaries, recoveries))
        world = len({r for c in cols for r in c.ranks}) or None
    recent = list(logs.steps[-21:])
    rate = None
    if len(recent) >= 2 and recent[-1]["time"] > recent[0]["time"]:
        # Only the newest incarnation's steps: a restart in the window would mix in downtime.
        tail = [recent[-1]]
        for line in reversed(recent[:-1]):
            if line["step"] >= tail[-1]["step"]:
                break
            tail.append(line)
        if len(tail) >= 2:
            rate = (len(tail) - 1) / (tail[0]["time"] - tail[-1]["time"])
    step_times = [v for s in logs.steps[-50:] if (v := number(s, "step_s")) is not None]
    failures = [e for e in logs.events if e.get("type") in FAILURE_TYPES]
    failure_times = [float(e["time"]) for e in failures] + [
        r.time - r.downtime_s for r in recoveries if r.is_failure
    ]
    last_failure = max(failure_times) if failure_times else None
    times = [float(logs.events[-1]["time"])] if logs.events else []
    times += [float(last["time"])] if last else []
    newest = max(times) if times else None
    alerts: list[dict[str, str]] = []
    if failures:
        f = failures[-1]
        recovered = any(r.time >= float(f["time"]) for r in recoveries) or any(
            s["time"] > float(f["time"]) for s in logs.steps
        )
        if not recovered:
            ranks = ", ".join(str(r) for r in f.get("ranks", []))
            alerts.append(_alert("critical", "failed",
                                 f"{f.get('type')} of rank {ranks} at step {f.get('step')}: "
                                 "no recovery and no step since"))
    storm = [r for r in recoveries if r.is_failure and newest is not None
             and newest - r.time <= STORM_WINDOW_S]
    if len(storm) >= STORM_COUNT:
        alerts.append(_alert("critical", "restart_storm",
                             f"{len(storm)} recoveries in the last {STORM_WINDOW_S / 60:.0f} minutes"))
    alerts += _checkpoint_alerts(records, recoveries, current)
    alerts += _slower_ranks(logs, recoveries)
    skipped = sum(1 for e in logs.events if e.get("type") == "checkpoint_skipped")
    if skipped:
        alerts.append(_alert("info", "skipped_saves", f"{skipped} checkpoint(s) skipped (no free host buffer)"))
    ranks_live = list(live or [])
    silent = [r for r in ranks_live if r.get("state") == "running" and (r.get("silent_s") or 0) > SILENT_S]
    if silent:
        alerts.append(_alert("critical", "silent",
                             f"rank {', '.join(str(r['rank']) for r in silent)} silent for over {SILENT_S:g} s"))
    if logs.bad_lines:
        alerts.append(_alert("info", "bad_lines", "unreadable lines skipped: " + ", ".join(
            f"{n} in {name}" for name, n in logs.bad_lines)))
    levels = {a["level"] for a in alerts}
    health = "failing" if "critical" in levels else "degraded" if "warning" in levels else "healthy"
    quiet_after = max(30.0, 20 * statistics.median(step_times)) if step_times else 30.0
    return {
        "label": logs.sources.label,
        "health": health,
        "active": newest is not None and now - newest <= quiet_after,
        "finished": _finished(logs.nodes),
        "step": current,
        "layout": last.get("layout"),
        "world_size": world,
        "grad_accum": last.get("grad_accum"),
        "step_rate": round(rate, 4) if rate else None,
        "step_s": round(statistics.median(step_times), 6) if step_times else None,
        "goodput": goodput(logs),
        "since_failure_s": round(now - last_failure, 3) if last_failure is not None else None,
        "newest_record_age_s": round(now - newest, 3) if newest is not None else None,
        "alerts": alerts,
        "nodes": [dict(n) for n in logs.nodes],
        "live": ranks_live,
    }


# nodes.json states of a node whose agent still runs (or may run again).
ALIVE_STATES = ("starting", "running", "rejoining", "spare", "stopped")


def _finished(nodes: Sequence[Mapping[str, Any]]) -> bool:
    """The job ran to its end: an agent exits cleanly only when its workers finished, and no
    node's agent is left running. A node that came back as a spare and was still waiting to join
    when the job ended may have exited with an error (its rendezvous closed): that does not
    undo the others' clean exit."""
    states = [n.get("state") for n in nodes]
    return "done" in states and not any(s in ALIVE_STATES for s in states)
