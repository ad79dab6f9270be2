"""`elastickit reshard SRC DST --to LAYOUT [--rules FILE] [--dry-run]`: rewrite a checkpoint for
another parallel layout offline, or print the plan without touching tensor bytes."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import typer

from ._console import human_bytes, out, plural, progress
from ._errors import handled

PER_RANK_ROWS = 32
"""Dry runs of larger worlds print one row per group of ranks that share a plan."""


@handled
def reshard(
    src: str = typer.Argument(
        ..., help="The source checkpoint (a step directory, or a root: its newest)."
    ),
    dst: str = typer.Argument(
        None,
        help="A new checkpoint root to write (DST/step-N/; not needed with --dry-run).",
    ),
    to: str = typer.Option(..., "--to", help="The target layout, e.g. tp=2,pp=2,dp=2[,zero=1]."),
    rules: str = typer.Option(
        None, "--rules", help="A TOML rules file (default: the rules stored in SRC)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print each target rank's reads, bytes and peak memory only."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the plan (--dry-run) or what was written as JSON."
    ),
) -> None:
    """Reshard a checkpoint for another layout (the target's rules say how tensors split)."""
    from elastickit.checkpoint.errors import RequestError
    from elastickit.checkpoint.format.directory import StepDir
    from elastickit.checkpoint.format.manifest import step_dir_name
    from elastickit.checkpoint.paths import is_url, location
    from elastickit.inspection import resolve_elastickit
    from elastickit.remote import object_step, upload_destination
    from elastickit.reshard.layout import ParallelLayout
    from elastickit.reshard.offline import plan_reshard, reshard_step
    from elastickit.reshard.rules import RuleSet, load_rules

    try:
        layout = ParallelLayout.parse(to)
    except ValueError as e:
        raise RequestError(f"--to: {e}") from None
    src = location(src, what="SRC")
    if is_url(src):  # read by ranged GETs
        store, step = object_step(src)
        source = store.open_step(step)
    else:
        source = StepDir(resolve_elastickit(src))
    path, manifest = source.where, source.manifest
    ruleset = load_rules(rules) if rules else RuleSet.from_json(manifest.rules, source=f"{path} rules")
    if dry_run:
        with progress() as bar:
            plans = plan_reshard(manifest, layout, ruleset, on_progress=bar)
        rows = [_row(p, layout) for p in plans]
        if as_json:
            print(
                json.dumps(
                    {
                        "source": path,
                        "source_layout": manifest.layout.to_json(),
                        "target": str(layout),
                        "ranks": rows,
                    },
                    indent=1,
                )
            )
            return
        out.print(
            f"[bold]{path}[/bold] (step {manifest.step}, {plural(manifest.world_size, 'rank')}) -> "
            f"{layout} ({plural(layout.world_size, 'rank')}); dry run, no tensor bytes read"
        )
        _print_plan(plans, rows, layout)
        return
    if not dst:
        raise RequestError("reshard needs a destination DST (or --dry-run)")
    dst = location(dst, what="DST")
    with contextlib.ExitStack() as stack, progress() as bar:
        here = stack.enter_context(upload_destination(dst, sources=[src, path])) if is_url(dst) else dst
        manifest = reshard_step(source, here, layout, ruleset, protect=[src], on_progress=bar)
    if as_json:
        print(
            json.dumps(
                {
                    "source": path,
                    "destination": dst,
                    "checkpoint": os.path.join(dst, step_dir_name(manifest.step)),
                    "step": manifest.step,
                    "target": str(layout),
                    "world_size": manifest.world_size,
                    "files": sorted(manifest.files),
                    "total_bytes": manifest.total_bytes,
                },
                indent=1,
            )
        )
        return
    out.print(
        f"wrote {os.path.join(dst, step_dir_name(manifest.step))}: step {manifest.step} for "
        f"{layout} ({len(manifest.files)} file(s), {human_bytes(manifest.total_bytes)} logical); "
        f"resume with --ckpt {dst}"
    )


def _row(p: Any, layout: Any) -> dict[str, Any]:
    return {
        "rank": p.rank,
        "coords": layout.coords(p.rank),
        "tensors": len(p.tensors),
        "reads": len(p.plan.reads),
        "files": p.plan.files,
        "bytes_needed": p.plan.bytes_needed,
        "bytes_read": p.plan.bytes_read,
        "target_bytes": p.target_bytes,
        "peak_bytes": p.peak_bytes,
    }


def _print_plan(plans: list[Any], rows: list[dict[str, Any]], layout: Any) -> None:
    """One row per rank for small worlds; beyond, one row per group of ranks sharing a plan
    (the coordinates they have in common, and how many ranks)."""
    from rich.table import Table

    groups: dict[int, list[dict[str, Any]]] = {}
    for p, r in zip(plans, rows, strict=True):
        groups.setdefault(id(p.plan) if len(rows) > PER_RANK_ROWS else p.rank, []).append(r)
    table = Table(
        "rank" if len(rows) <= PER_RANK_ROWS else "ranks",
        "coords",
        "tensors",
        "reads",
        "files",
        "needed",
        "read",
        "peak",
        box=None,
        pad_edge=False,
    )
    for members in groups.values():
        r = members[0]
        axes = [a for a in layout.order if layout.size(a) > 1]
        common = [a for a in axes if all(m["coords"][a] == r["coords"][a] for m in members)]
        coords = ",".join(f"{a}={r['coords'][a]}" for a in common) or "-"
        who = str(r["rank"]) if len(members) == 1 else plural(len(members), "rank")
        table.add_row(
            who,
            coords,
            str(r["tensors"]),
            str(r["reads"]),
            str(len(r["files"])),
            human_bytes(r["bytes_needed"]),
            human_bytes(r["bytes_read"]),
            human_bytes(r["peak_bytes"]),
        )
    out.print(table)
