"""Events: every record of the event log as a table row, newest first, filterable by type and
rank (the page filters in the browser; `/api/events?type=crash&rank=3` filters here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .logs import RunLogs

MAX_ROWS = 500


def describe(e: Mapping[str, Any]) -> str:
    """One line saying what the record means."""
    kind = e.get("type")
    ranks = ", ".join(str(r) for r in e.get("ranks", []))
    ev = e.get("evidence") if isinstance(e.get("evidence"), dict) else {}
    if kind == "crash":
        how = "process exited" if ev.get("process_exited") else "heartbeat silent"
        return f"rank {ranks} crashed ({how}; pid {ev.get('pid')} on {ev.get('host')})"
    if kind == "hang":
        return (f"rank {ranks} never entered {e.get('op')} seq {e.get('seq')} of group "
                f"{e.get('group')}; ranks {ev.get('waiting_ranks')} waited {ev.get('waited_s')} s")
    if kind == "slow_rank":
        return f"rank {ranks} is slow: the others wait on it ({ev.get('median_gap_share')} of a step)"
    if kind == "slow_link":
        src = ev.get("source")
        val = ev.get("pair_op_s") if src == "p2p" else ev.get("group_op_s")
        base = ev.get("other_pairs_op_s") if src == "p2p" else ev.get("other_groups_op_s")
        return f"link {ranks.replace(', ', ' <-> ')} is slow: {val} s per op vs {base} s elsewhere"
    if kind == "checkpoint":
        tiers = e.get("tiers") if isinstance(e.get("tiers"), dict) else {}
        status = ", ".join(f"{k} {v.get('status')}" for k, v in sorted(tiers.items()) if isinstance(v, dict))
        return f"checkpoint {e.get('step')}: {status or 'memory only'}"
    if kind == "checkpoint_skipped":
        return f"checkpoint {e.get('step')} skipped: {(e.get('skipped_tiers') or {}).get('all', '')}"
    if kind == "restore":
        return f"restored step {e.get('step')} from the {e.get('tier')} tier"
    if kind == "restore_fallback":
        return f"could not restore step {e.get('step')} from the {e.get('tier')} tier: {e.get('reason')}"
    if kind == "recovery":
        node = f" on node {e.get('node')}" if e.get("node") is not None else ""
        restore = e.get("restore") if isinstance(e.get("restore"), dict) else {}
        return (f"recovered from {e.get('cause')} of rank {ranks}{node}: step {restore.get('step')} "
                f"from {restore.get('tier')}, {e.get('old_layout')} -> {e.get('new_layout')}")
    return ""


def _ranks(e: Mapping[str, Any]) -> list[int]:
    r = e.get("ranks")
    return [x for x in r if isinstance(x, int)] if isinstance(r, list) else []


def events_panel(logs: RunLogs, *, type: str = "", rank: int | None = None,
                 limit: int = MAX_ROWS) -> dict[str, Any]:
    """The newest `limit` rows matching the filters, and every type and rank there is."""
    rows = []
    types: set[str] = set()
    ranks: set[int] = set()
    matched = 0
    for e in reversed(logs.events):
        types.add(str(e.get("type")))
        ranks.update(_ranks(e))
        if type and e.get("type") != type:
            continue
        if rank is not None and rank not in _ranks(e):
            continue
        matched += 1
        if len(rows) < limit:
            step = e.get("step")
            rows.append({
                "time": e["time"],
                "type": str(e.get("type")),
                "ranks": _ranks(e),
                "step": step if isinstance(step, int) else None,
                "text": describe(e),
                "record": dict(e),
            })
    return {"rows": rows, "matched": matched, "total": len(logs.events),
            "types": sorted(types), "ranks": sorted(ranks)}
