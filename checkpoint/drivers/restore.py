"""Restore with fallback across tiers, as one call, on every rank.

`restore_newest` gathers what every rank's tiers hold, orders the candidates (freshest first,
the faster tier first for equal steps) and hands them one by one to the caller's `load`, which
opens, matches and loads one candidate on every rank. A candidate a tier cannot serve whole, or
whose load raises `RankFailure` (a missing file, a failing checksum on some rank), is skipped,
logged and recorded (`restore_fallback` events); the first that loads is the result. What
"load" means (a torch state, resharded) is the caller's business: this driver knows tiers only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..coord import Coordinator
from ..errors import DataError, RankFailure, RequestError
from ..events import EventLog
from ..plan.matching import RestoreReport, describe_gap
from ..storage.tier import Tier

log = logging.getLogger("elastickit")


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A checkpoint some tier can serve: its step, the tier's name, and the tier. `unservable`:
    why the tier holds the step committed but cannot serve it whole (the restore skips it,
    saying so)."""

    step: int
    tier: str
    source: Tier
    unservable: str = ""


def candidates(gathered: list[dict[str, Any]], tiers: Sequence[Tier]) -> list[Candidate]:
    """Every restorable (step, tier), freshest first, the faster tier first for equal steps.

    `gathered[r]` is rank r's inventory: {<tier name>: tier.inventory(r)}. A tier says itself
    what it can serve (memory: the snapshots every rank holds), and what it holds but cannot
    serve (a candidate with `unservable` set, in the same order).
    """
    out: list[tuple[int, int, Candidate]] = []
    for order, t in enumerate(tiers):
        inventories = [g.get(t.name) for g in gathered]
        for step in t.restorable(inventories):
            out.append((-step, order, Candidate(step=step, tier=t.name, source=t)))
        for step, why in t.unservable(inventories).items():
            out.append((-step, order, Candidate(step=step, tier=t.name, source=t, unservable=why)))
    return [c for _, _, c in sorted(out, key=lambda x: (x[0], x[1]))]


def restore_newest(
    coord: Coordinator,
    tiers: Sequence[Tier],
    load: Callable[[Candidate, str], RestoreReport],
    *,
    events: EventLog,
    root: str,
    step: int | None = None,
) -> RestoreReport | None:
    """The freshest candidate of `tiers` (or the one of `step`) that `load(candidate, what)`
    loads on every rank; None when no tier holds a checkpoint. Every rank calls it alike.

    Raises RequestError when no tier holds `step`, DataError naming each candidate's cause when
    every one failed; whatever else `load` raises (a mismatch) passes through at once.
    """
    mine = {t.name: t.inventory(coord.rank) for t in tiers}
    found = candidates(coord.all_gather(mine, phase="restore inventory"), tiers)
    if step is not None:
        found = [c for c in found if c.step == step]
        if not found:
            raise RequestError(f"no tier holds a committed checkpoint of step {step} under {root}")
    reasons: list[str] = []
    for cand in found:
        what = f"step {cand.step} on the {cand.tier} tier"
        why = cand.unservable  # committed, but the tier cannot serve it whole: skipped like a failure
        if not why:
            try:
                report = load(cand, what)
            except RankFailure as e:
                why = str(e)
        if why:
            reasons.append(f"{what}: {why}")
            log.warning("elastickit: cannot restore %s (%s); trying the next", what, why)
            if coord.rank == 0:
                events.emit("restore_fallback", step=cand.step, tier=cand.tier, reason=why)
            continue
        if coord.rank == 0:
            gap = {"unused": len(report.unused), "missing": len(report.missing)} if report.unused or report.missing else {}
            events.emit("restore", step=cand.step, tier=cand.tier, path=report.path, skipped=reasons, **gap)
        if report.unused or report.missing:
            log.warning("elastickit: restored %s with strict=False: %s; they were skipped", what, describe_gap(report.unused, report.missing))
        log.info("elastickit: restored %s (%s)", what, report.path)
        return report
    if reasons:
        raise DataError(f"no checkpoint under {root} could be restored: {'; '.join(reasons)}", path=root)
    return None
