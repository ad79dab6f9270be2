"""What `elastickit train` says once its job has ended: one line on what happened, one on how
to resume, and the run's checkpoints (committed, superseded, skipped, failed).

It reads what the job left behind, never the processes: the event log (the monitor's
`crash`/`hang` events, the Checkpointer's `checkpoint` records), the checkpoint root, and the
job's log (the `error (rank R): ...` lines of the workers, torchrun's root-cause block).
Every function is pure over those inputs, so tests feed it real files.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .preflight import plural

__all__ = [
    "checkpoint_lines",
    "compact_steps",
    "failure_line",
    "resume_line",
    "worker_errors",
]

_ERROR_LINE = re.compile(r"^error \(rank (\d+)\): (.*)$", re.MULTILINE)
_ANNOUNCED = re.compile(
    r"^elastickit\.faults: ((crash|hang):\S*): (?:crashing|hanging) at step (\d+)$", re.MULTILINE
)
_SUPERSEDED = re.compile(r"superseded by step (\d+)")
_ROOT_CAUSE = re.compile(r"Root Cause.*?\brank\s*:\s*(\d+).*?\bexitcode\s*:\s*(-?\d+)", re.DOTALL)


def compact_steps(steps: Iterable[int]) -> str:
    """`2, 4, 6-9`: sorted, runs of consecutive steps joined."""
    out: list[str] = []
    run: list[int] = []
    for s in sorted(set(steps)):
        if run and s != run[-1] + 1:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        run.append(s)
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out)


def _step_word(steps: Sequence[int]) -> str:
    return f"step{'s' if len(steps) > 1 else ''} {compact_steps(steps)}"


def worker_errors(log_text: str) -> dict[str, list[int]]:
    """The workers' one-sentence errors (`error (rank R): message`) -> the ranks that said it."""
    found: dict[str, list[int]] = {}
    for m in _ERROR_LINE.finditer(log_text):
        found.setdefault(m.group(2).strip(), []).append(int(m.group(1)))
    return {msg: sorted(set(ranks)) for msg, ranks in found.items()}


def _ranks(ranks: Sequence[int], world_size: int) -> str:
    if len(ranks) == world_size and world_size > 1:
        return "every rank"
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _injected(kind: str, rank: int, inject: Sequence[str]) -> str:
    for spec in inject:
        if spec.startswith(f"{kind}:") and re.search(rf"(^|:)rank={rank}(:|$)", spec):
            return f" (injected by --inject {spec})"
    return ""


def _fault_line(kind: str, ranks: Sequence[int], step: int, op: str, inject: Sequence[str]) -> str:
    who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    at = f" at step {step}" if step >= 1 else ""
    if kind == "crash":
        what = f"{who} crashed{at}: its process exited"
    else:
        what = f"{who} hung{at}: the others waited in {op or 'a collective'} for it, and the job was stopped"
    return what + _injected(kind, ranks[0], inject)


def _monitor_line(
    events: Sequence[Mapping[str, Any]], log_text: str, inject: Sequence[str]
) -> str | None:
    """The first crash (else hang): as the monitor recorded it, else as an injected fault
    announced it in the log (the monitor runs on rank 0, which torchrun may stop first)."""
    for kind in ("crash", "hang"):
        for e in events:
            if e.get("type") == kind and e.get("ranks"):
                ranks = [int(r) for r in e["ranks"]]
                return _fault_line(
                    kind, ranks, int(e.get("step", -1)), str(e.get("op", "")), inject
                )
        for m in _ANNOUNCED.finditer(log_text):
            rank = re.search(r"(?:^|:)rank=(\d+)(?::|$)", m.group(1))
            if m.group(2) == kind and rank:
                return _fault_line(kind, [int(rank.group(1))], int(m.group(3)), "", inject)
    return None


def failure_line(
    *,
    returncode: int,
    stopped_by: int | None,
    events: Sequence[Mapping[str, Any]],
    log_text: str,
    world_size: int,
    inject: Sequence[str] = (),
) -> str:
    """One sentence on why the job ended without finishing (for a nonzero exit)."""
    if stopped_by is not None:
        name = signal.Signals(stopped_by).name
        return (
            f"interrupted ({name}): stopped the training job and its {plural(world_size, 'rank')}"
        )
    line = _monitor_line(events, log_text, inject)
    if line:
        return line
    errors = worker_errors(log_text)
    if errors:
        msg, ranks = next(iter(errors.items()))
        more = len(errors) - 1
        tail = f" (and {plural(more, 'other error')})" if more else ""
        return f"{msg} ({_ranks(ranks, world_size)}){tail}"
    m = _ROOT_CAUSE.search(log_text)
    if m:
        rank, code = int(m.group(1)), int(m.group(2))
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code < 0 and -code in signal.Signals._value2member_map_
            else f"exited with code {code}"
        )
        return f"rank {rank} {how}" + (_injected("crash", rank, inject) if code else "")
    return f"the training job failed (torchrun exit code {returncode})"


def resume_line(
    *, ckpt: str | None, last_step: int | None, inject: Sequence[str], log_path: str
) -> str:
    """How to go on: the checkpoint a rerun resumes from, and where the details are."""
    details = f" (details: {log_path})"
    if not ckpt:
        return f"no checkpoints were kept (no --ckpt); a rerun starts from step 1{details}"
    # A crash or hang fault fires again on the rerun: it is part of the command.
    again = (
        "the same command without --inject"
        if any(s.startswith(("crash:", "hang:")) for s in inject)
        else "the same command"
    )
    if not last_step:
        return f"no checkpoint was committed in {ckpt} yet; {again} starts over{details}"
    return f"last checkpoint: step {last_step} in {ckpt}; run {again} to resume{details}"


def checkpoint_lines(records: Sequence[Mapping[str, Any]], ckpt: str) -> list[str]:
    """The run's checkpoints from its `checkpoint` / `checkpoint_skipped` records: which were
    committed, and every one that was superseded, skipped or failed (else only in the log)."""
    committed: set[int] = set()
    superseded: dict[str, set[int]] = {}
    failed: list[tuple[int, str, str]] = []
    skipped: list[tuple[int, str]] = []
    for r in records:
        step = int(r.get("step", -1))
        if r.get("type") == "checkpoint_skipped":
            reasons = r.get("skipped_tiers") or {}
            skipped.append((step, "; ".join(str(v) for v in reasons.values()) or "no reason given"))
            continue
        if r.get("type") != "checkpoint":
            continue
        for tier, info in (r.get("tiers") or {}).items():
            status = str((info or {}).get("status", ""))
            if status == "committed":
                committed.add(step)
            elif _SUPERSEDED.match(status):
                superseded.setdefault(tier, set()).add(step)
            elif status.startswith("failed"):
                failed.append((step, tier, status.removeprefix("failed: ")))
    lines = []
    if committed:
        lines.append(f"checkpoints: {_step_word(sorted(committed))} committed in {ckpt}")
    elif records:
        lines.append(f"checkpoints: none committed in {ckpt}")
    for tier, steps in sorted(superseded.items()):
        lines.append(
            f"checkpoints superseded on the {tier} tier: {_step_word(sorted(steps))} (the tier "
            "was busy with an earlier checkpoint and wrote the newest one when free)"
        )
    for step, reason in skipped:
        lines.append(f"checkpoint {step} skipped: {reason}")
    for step, tier, why in failed[:3]:
        lines.append(f"checkpoint {step} failed on the {tier} tier: {why}")
    if len(failed) > 3:
        lines.append(f"... and {plural(len(failed) - 3, 'more failed checkpoint')}")
    return lines
