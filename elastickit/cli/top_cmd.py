"""`elastickit top`: the dashboard's summary in a terminal (a rich live view), for login nodes."""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from elastickit.cli._errors import handled

SPARK = "▁▂▃▄▅▆▇█"
STYLE = {"healthy": "bold green", "degraded": "bold yellow", "failing": "bold red"}
LEVEL = {"critical": "red", "warning": "yellow", "info": "cyan"}


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1:
        return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"
    if x < 120:
        return f"{x:.1f} s"
    return f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.1f} h"


def _spark(values: list[float | None], top: float) -> str:
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        else:
            out.append(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1))) if top > 0 else 0])
    return "".join(out)


def render(summary: dict[str, Any]) -> Any:
    """The whole summary as one rich renderable (no I/O)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from elastickit.cli._console import human_bytes

    job, hm, lk = summary["job"], summary["heatmap"], summary["links"]
    inc, ck, ev = summary["incidents"], summary["checkpoints"], summary["events"]
    gp = job["goodput"]
    head = Text()
    head.append("elastickit top  ", style="bold")
    head.append(f" {job['health']} ", style=f"reverse {STYLE.get(job['health'], '')}")
    head.append(f"  {job['label']}\n")
    ettr = f"{gp['ettr'] * 100:.1f}%" if gp.get("ettr") is not None else "-"
    rate = f"{job['step_rate']:.2f} steps/s" if job.get("step_rate") else "-"
    since = _s(job["since_failure_s"]) + " ago" if job.get("since_failure_s") is not None else "none"
    head.append(f"step {job['step'] if job['step'] is not None else '-'}   layout {job['layout'] or '-'}"
                f" ({job['world_size'] or '?'} ranks)   {rate}   ETTR {ettr}   last failure {since}"
                + ("   run finished" if job.get("finished") else ""))
    parts: list[Any] = [head]
    for a in job["alerts"]:
        parts.append(Text(f"{a['level']}: {a['text']}", style=LEVEL.get(a["level"], "")))
    if hm.get("available"):
        t = Table(title="ranks (how long the others waited for each, per step, newest right)",
                  title_justify="left", expand=False)
        for col in ("rank", "straggler", "held others (last)", "recent steps"):
            t.add_column(col)
        held = [v for row in hm["held_s"] for v in row if v is not None]
        top = max(sorted(held)[int(0.95 * (len(held) - 1))] if held else 0.0, 1e-3)
        for i, rank in enumerate(hm["ranks"]):
            row = hm["held_s"][i]
            last = next((v for v in reversed(row) if v is not None), None)
            slow = rank in hm["slow"]
            t.add_row(f"{rank}", f"{hm['scores'].get(str(rank), 0):.2f}" + (" slow" if slow else ""),
                      _s(last), _spark(row[-30:], top), style="red" if slow else None)
        parts.append(t)
    if lk.get("available") and lk["slow"]:
        parts.append(Text("slow links: " + ", ".join(f"{a} <-> {b}" for a, b in lk["slow"]), style="yellow"))
    for r in job.get("live") or []:
        bad = not r["reachable"] or (r["state"] == "running" and r["silent_s"] > 5)
        parts.append(Text(f"rank {r['rank']}: step {r['step']} {r['state']}, heartbeat {_s(r['silent_s'])} ago"
                          f" on {r['host']}", style="red" if bad else "green"))
    if inc["incidents"]:
        t = Table(title=f"incidents ({inc['num_failures']} failure{'' if inc['num_failures'] == 1 else 's'}, MTTR {_s(inc['mttr_s'])})",
                  title_justify="left")
        for col in ("#", "what", "status", "cost", "by phase"):
            t.add_column(col)
        for i in inc["incidents"][:6]:
            rec = i["recovery"]
            phases = ", ".join(f"{p['phase']} {_s(p['s'])}" for p in rec["phases"] if p["s"] > 0) if rec else ""
            t.add_row(str(i["id"]), i["summary"], i["status"], _s(i["cost_s"]), phases,
                      style="red" if i["status"] == "not recovered" else None)
        parts.append(t)
    if ck["tiers"]:
        t = Table(title="checkpoints", title_justify="left")
        for col in ("tier", "newest step", "age", "at risk", "size", "throughput"):
            t.add_column(col)
        for row in ck["tiers"]:
            t.add_row(row["tier"], str(row["newest_step"] if row["newest_step"] is not None else "-"),
                      _s(row["age_s"]), str(row["at_risk_steps"] if row["at_risk_steps"] is not None else "-"),
                      human_bytes(row["stored_bytes"]) if row["stored_bytes"] else "-",
                      human_bytes(row["throughput_bps"]) + "/s" if row["throughput_bps"] else "-")
        parts.append(t)
    for w in ck["what_if"]:
        parts.append(Text(w["text"], style="red" if w["step"] is None else None))
    recent = ev["rows"][:6]
    if recent:
        parts.append(Text("recent events", style="bold"))
        for r in recent:
            stamp = time.strftime("%H:%M:%S", time.localtime(r["time"]))
            parts.append(Text(f"{stamp}  {r['type']:<12} {r['text']}"))
    return Group(*parts)


@handled
def top(
    run: str | None = typer.Argument(None, help="The run directory."),
    events: str | None = typer.Option(None, "--events", help="An events file instead of RUN."),
    store: str | None = typer.Option(None, "--store", help="HOST:PORT of the running job's TCPStore."),
    ckpt: str | None = typer.Option(None, "--ckpt", help="The checkpoint root, when not RUN/ckpt."),
    local: str | None = typer.Option(None, "--local", help="Node-local tier directories, e.g. /dev/shm/ek/{node}."),
    world_size: int = typer.Option(0, "--world-size", help="Ranks of the job (--store; 0: discover)."),
    prefix: str = typer.Option("auto", "--prefix", help="The monitor's store key prefix (--store)."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes."),
    once: bool = typer.Option(False, "--once", help="Print the summary once and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print every panel as JSON once and exit."),
) -> None:
    """The dashboard's summary in the terminal, refreshed live (Ctrl-C to stop)."""
    from rich.live import Live

    from elastickit.checkpoint.errors import RequestError
    from elastickit.cli._console import out
    from elastickit.cli.dashboard_cmd import live_view, sources_from
    from elastickit.dashboard.summary import Dashboard

    if interval <= 0:
        raise RequestError(f"--interval {interval}: give a positive number of seconds.")
    sources = sources_from(run, events, ckpt, local, store)
    board = Dashboard(sources, live=live_view(store, prefix, world_size), min_interval_s=0.0)
    if as_json:
        print(json.dumps(board.summary(), default=str))
        return
    if once or not out.is_terminal:
        out.print(render(board.summary()))
        return
    with Live(render(board.summary()), console=out, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(interval)
            live.update(render(board.summary()))
