"""The link matrix: src x dst time per operation over recent steps, slow links marked.

Two kinds of evidence, as the monitor's detector uses them (NCCL Inspector and C4 report per
communicator; this folds them into one rank x rank picture):

- point to point: for each pair, each end's mean time per send/recv with the other. The
  matrix row is the rank that measured, the column its peer; both ends slow means the link.
- collectives of two-member groups (a tp or dp pair): the group's floor, the fastest member's
  time per collective (the transfer itself, not waiting for a straggler), shown on both cells.

Larger groups are listed beside the matrix with their floor. A cell is slow when the monitor
named that pair, or when it is at least `slow_link_ratio` times the median of the other cells
and `slow_link_min_s` longer (the detector's thresholds).
"""

from __future__ import annotations

import statistics
from typing import Any

from elastickit.monitor.detector import DetectorConfig

from .logs import RunLogs
from .records import Recovery, parse_all
from .windows import columns, latest_segment

WINDOW_STEPS = 20


def links_panel(logs: RunLogs, *, window: int = WINDOW_STEPS) -> dict[str, Any]:
    """The matrix of the newest incarnation's last `window` steps."""
    recoveries, _ = parse_all(logs.events, "recovery", Recovery.from_dict)
    cols = latest_segment(columns(logs.summaries, recoveries))[-window:]
    if not cols:
        return {"available": False, "why": "no per-rank step summaries (ranks.jsonl)"}
    ranks = sorted({r for c in cols for r in c.ranks})
    # Per (rank, peer): p2p time and ops over the window.
    p2p: dict[tuple[int, int], list[float]] = {}
    groups: dict[tuple[str, tuple[int, ...]], dict[int, list[float]]] = {}
    for c in cols:
        for r, s in c.ranks.items():
            for p in s.peers:
                if p.num_ops > 0 and p.peer >= 0:
                    acc = p2p.setdefault((r, p.peer), [0.0, 0.0, 0.0])
                    acc[0] += p.wait_s
                    acc[1] += p.num_ops
                    acc[2] += p.num_bytes
            for g in s.groups:
                if g.num_ops > 0 and len(g.ranks) >= 2:
                    acc = groups.setdefault((g.group, tuple(g.ranks)), {}).setdefault(r, [0.0, 0.0, 0.0])
                    acc[0] += g.wait_s
                    acc[1] += g.num_ops
                    acc[2] += g.num_bytes
    n = len(ranks)
    index = {r: i for i, r in enumerate(ranks)}
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    kind: list[list[str | None]] = [[None] * n for _ in range(n)]
    for (a, b), (w, ops, _) in p2p.items():
        if a in index and b in index:
            matrix[index[a]][index[b]] = round(w / ops, 6)
            kind[index[a]][index[b]] = "p2p"
    group_rows = []
    for (name, members), per_rank in sorted(groups.items()):
        if len(per_rank) < len(members):
            continue  # not every member reported: no floor
        floor = min(w / ops for w, ops, _ in per_rank.values())
        ops_per_step = statistics.median(ops for _, ops, _ in per_rank.values()) / len(cols)
        bytes_per_step = statistics.median(b for _, _, b in per_rank.values()) / len(cols)
        group_rows.append({"group": name, "ranks": list(members), "op_s": round(floor, 6),
                           "ops_per_step": round(ops_per_step, 2),
                           "bytes_per_step": int(bytes_per_step), "slow": False})
        if len(members) == 2:
            a, b = members
            for x, y in ((a, b), (b, a)):
                if x in index and y in index and matrix[index[x]][index[y]] is None:
                    matrix[index[x]][index[y]] = round(floor, 6)
                    kind[index[x]][index[y]] = "group"
    cfg = DetectorConfig()
    slow_pairs: set[tuple[int, int]] = set()
    began = min(s.time_s for s in cols[0].ranks.values())  # the window's first step
    slow_groups: set[tuple[int, ...]] = set()
    for e in logs.events:
        if e.get("type") != "slow_link" or e["time"] < began:
            continue
        rs = tuple(sorted(r for r in e.get("ranks", []) if isinstance(r, int)))
        if len(rs) == 2:
            slow_pairs.add(rs)
        slow_groups.add(rs)
    # One value per unordered pair: the smaller of its two cells (both ends must see it slow).
    pairs: dict[tuple[int, int], float] = {}
    for i in range(n):
        for j in range(i + 1, n):
            ends = [v for v in (matrix[i][j], matrix[j][i]) if v is not None]
            if ends:
                pairs[(ranks[i], ranks[j])] = min(ends)
    for pair, v in pairs.items():
        others = [x for k, x in pairs.items() if k != pair]
        if others:
            base = statistics.median(others)
            if v >= cfg.slow_link_ratio * base and v - base >= cfg.slow_link_min_s:
                slow_pairs.add(pair)
    for g in group_rows:
        g["slow"] = tuple(sorted(g["ranks"])) in slow_groups or (
            len(g["ranks"]) == 2 and tuple(sorted(g["ranks"])) in slow_pairs
        )
    return {
        "available": True,
        "ranks": ranks,
        "matrix": matrix,
        "kind": kind,
        "slow": sorted([list(p) for p in slow_pairs]),
        "groups": group_rows,
        "steps": [cols[0].step, cols[-1].step],
        "thresholds": {"ratio": cfg.slow_link_ratio, "min_s": cfg.slow_link_min_s},
    }
