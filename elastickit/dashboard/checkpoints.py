"""Checkpoints: per tier the recovery point (newest committed step and its age), size,
throughput, compression and skipped saves; and the what-if for every node.

The tier figures come from the `checkpoint` records (rank 0's view of each save: every tier's
status, stored bytes, persist time, compression ratio, peer copy bytes); what is on disk now
comes from the scan of the tiers (`recovery_point.scan_tiers`), which the what-if reads.
"""

from __future__ import annotations

import statistics
from typing import Any

from .logs import RunLogs
from .recovery_point import TierContents, what_if
from .records import CheckpointRecord, parse_all

TIER_ORDER = ("memory", "local", "peer", "persistent")
RECENT = 10


def checkpoints_panel(
    logs: RunLogs, contents: TierContents, *, now: float, current_step: int | None
) -> dict[str, Any]:
    """Per-tier rows, the restores so far, and the what-if rows."""
    records, bad = parse_all(logs.events, "checkpoint", CheckpointRecord.from_dict)
    records.sort(key=lambda r: r.time)
    names = {t.tier for r in records for t in r.tiers}
    if any(t.peer_bytes for r in records for t in r.tiers):
        names.add("peer")
    rows = [_tier_row(name, records, contents, now, current_step) for name in
            sorted(names, key=lambda n: (TIER_ORDER.index(n) if n in TIER_ORDER else 9, n))]
    if not rows and contents.persistent_steps:  # no records (another log), only the disk
        newest = contents.persistent_steps[-1]
        rows.append({"tier": "persistent", "newest_step": newest, "newest_time": None,
                     "age_s": None, "at_risk_steps": _at_risk(current_step, newest),
                     "on_disk": list(contents.persistent_steps), "stored_bytes": None,
                     "persist_s": None, "throughput_bps": None, "compression_ratio": None,
                     "committed": None, "superseded": None, "failed": None, "last_failure": ""})
    skipped = [e for e in logs.events if e.get("type") == "checkpoint_skipped"]
    blocking = [r.blocking_s for r in records]
    restores = [
        {"time": e.get("time"), "step": e.get("step"), "tier": e.get("tier"),
         "type": e.get("type"), "reason": e.get("reason", "")}
        for e in logs.events if e.get("type") in ("restore", "restore_fallback")
    ]
    return {
        "tiers": rows,
        "num_checkpoints": len(records),
        "snapshot_bytes": records[-1].snapshot_bytes if records else None,
        "blocking_s": {
            "median": round(statistics.median(blocking), 6) if blocking else None,
            "max": round(max(blocking), 6) if blocking else None,
        },
        "skipped_saves": len(skipped),
        "skipped_reasons": sorted({str((e.get("skipped_tiers") or {}).get("all", "")) for e in skipped} - {""}),
        "restores": restores[-20:],
        "what_if": what_if(contents, current_step),
        "current_step": current_step,
        "bad_records": bad,
    }


def _at_risk(current: int | None, newest: int | None) -> int | None:
    return None if current is None or newest is None else max(0, current - newest)


def _tier_row(name: str, records: list[CheckpointRecord], contents: TierContents, now: float,
              current_step: int | None) -> dict[str, Any]:
    source = "local" if name == "peer" else name
    results = [(r, r.tier(source)) for r in records]
    results = [(r, t) for r, t in results if t is not None]
    if name == "peer":
        results = [(r, t) for r, t in results if t.committed and t.peer_bytes]
    committed = [(r, t) for r, t in results if t.committed]
    newest = committed[-1] if committed else None
    recent = committed[-RECENT:]
    if name == "peer":
        sizes = [t.peer_bytes for _, t in recent if t.peer_bytes]
        times = [t.peer_s for _, t in recent if t.peer_s]
    else:
        sizes = [t.stored_bytes for _, t in recent if t.stored_bytes]
        times = [t.persist_s for _, t in recent if t.persist_s]
    rates = [b / s for b, s in zip(sizes, times) if s and s > 0]
    failures = [t for _, t in results if t.failed]
    if name == "persistent":
        on_disk: Any = list(contents.persistent_steps)
    elif name in ("local", "peer"):
        on_disk = {str(n.node): n.committed_steps() for n in contents.nodes}
    else:
        on_disk = None
    newest_step = newest[0].step if newest else None
    return {
        "tier": name,
        "newest_step": newest_step,
        "newest_time": newest[0].time if newest else None,
        "age_s": round(now - newest[0].time, 3) if newest else None,
        "at_risk_steps": _at_risk(current_step, newest_step),
        "on_disk": on_disk,
        "stored_bytes": sizes[-1] if sizes else None,
        "persist_s": round(statistics.median(times), 6) if times else None,
        "throughput_bps": round(statistics.median(rates)) if rates else None,
        "compression_ratio": newest[1].compression_ratio if newest and name != "peer" else None,
        "committed": len(committed),
        "superseded": sum(1 for _, t in results if t.superseded),
        "failed": len(failures),
        "last_failure": failures[-1].status if failures else "",
    }
