"""Recovery from a lost node: elastickit (in-process) against plain torchrun elastic + DCP.

    .venv/bin/python benchmarks/bench_recovery.py            # the full run, ~45 min on 2 cores
    .venv/bin/python benchmarks/bench_recovery.py --quick    # a check of the harness, ~8 min
    .venv/bin/python benchmarks/bench_recovery.py --only stop --stop-samples 5
        # only the SIGSTOP row, ~1 min a sample: replaces the hang row of results/recovery.json
        # and .md, keeps every other row

Both sides train the same model (the reference GPT, `tiny`, FSDP2), the same data and the same
global batch (24 samples, microbatches of 2) on 4 simulated nodes of one worker each, one
torchrun elastic agent per node, gloo, this machine.

(a) kill -> first step on the new layout, by phase, median over `--samples` kills: a node's
    whole process group is SIGKILLed once the job has trained at 4 nodes for a while; the node
    comes back `--rejoin-after` seconds later and the next kill waits until the job is back at 4.
    - elastickit: `elastickit train --nodes 4` machinery (`elastickit.elastic.simulate.Cluster`);
      phases from its `recovery` events. Also a hung node (SIGSTOP), target 2x step time + 2 s.
    - torchrun + DCP (`_torchrun_dcp_trainer.py`), "tuned" as in ANCHORS.md
      (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a store outside the nodes, last_call_timeout=1,
      keep_alive_interval=1, keep_alive_max_attempt=3) and with torchrun's "defaults" (agent 0
      hosts the store, so node 0 is never the one killed); DCP save every `--dcp-every` steps.
      Phases from the restarted workers' own timestamps.
(b) ETTR over `--ettr-minutes`: a node killed every `--kill-every` seconds (nodes 1, 2, 3 in
    turn), back `--rejoin-after` seconds later. ETTR = time in the steps that count (the last
    execution of each step of the final trajectory) / wall time from the first step on; the
    steps done in the window are reported next to it.

Results: benchmarks/results/recovery.md, recovery.json, recovery.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, free_port, machine, write_table

NODES = 4
BATCH = 24
HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _rows(run: str) -> list[dict[str, Any]]:
    out = []
    try:
        with open(os.path.join(run, "steps.jsonl")) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return out


def _events(run: str, kind: str = "recovery") -> list[dict[str, Any]]:
    out = []
    try:
        with open(os.path.join(run, "events.jsonl")) as f:
            for line in f:
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if d.get("type") == kind:
                    out.append(d)
    except FileNotFoundError:
        pass
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _stable_at(run: str, world: int, steps: int) -> bool:
    """The job has done `steps` steps in a row at `world` ranks (the newest lines)."""
    rows = _rows(run)[-steps:]
    return len(rows) == steps and all(r["world_size"] == world for r in rows)


def _wait(cond, timeout_s: float, poll=None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if poll is not None:
            poll()
        if cond():
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- elastickit
class ElastickitSide:
    """4 simulated nodes through elastickit's own supervisor (what `train --nodes` runs)."""

    name = "elastickit"

    def __init__(self, run: str, rejoin_after_s: float) -> None:
        from elastickit.elastic.simulate import Cluster, SimRequest, worker_flags

        self.run = run
        req = SimRequest(nodes=NODES, run=run, worker_args=worker_flags(steps=10_000_000, global_batch=BATCH, micro_batch=2),
                         rejoin_after_s=rejoin_after_s, quiet=True)
        self.cluster = Cluster(req, on_line=log)

    def start(self) -> None:
        self.cluster.start()

    def poll(self) -> None:
        self.cluster.poll()

    def kill(self, node: int, *, stop: bool = False) -> float:
        n = self.cluster.nodes[node]
        t = time.time()
        (self.cluster.stop_node if stop else self.cluster.kill_node)(n)
        return t

    def up(self, node: int) -> bool:
        return self.cluster.nodes[node].state in ("running", "rejoining")

    def stop(self) -> None:
        self.cluster.shutdown()


def elastickit_samples(args: argparse.Namespace, work: str) -> dict[str, Any]:
    run = os.path.join(work, f"ek-{args.only}" if getattr(args, "only", None) else "ek-a")
    side = ElastickitSide(run, args.rejoin_after)
    side.start()
    kills, stops = [], []
    try:
        for i in range(args.samples + args.stop_samples):
            stop = i >= args.samples
            if not _wait(lambda: _stable_at(run, NODES, args.warm_steps), 600, side.poll):
                log("elastickit: the job did not reach 4 nodes again; stopping the samples here")
                break
            node = 1 + i % (NODES - 1) if stop else i % NODES
            seen = len(_events(run))
            t = side.kill(node, stop=stop)
            log(f"elastickit: {'stopped' if stop else 'killed'} node {node}")
            if not _wait(lambda seen=seen: len(_events(run)) > seen, 120, side.poll):
                log("elastickit: no recovery within 120 s")
                continue
            rec = _events(run)[seen]
            rec["t_fault"] = t
            (stops if stop else kills).append(rec)
            log(f"elastickit: {rec['cause']} -> first step on {rec['new_layout']} in {rec['mttr_s']:.2f} s")
    finally:
        side.stop()
    rows = _rows(run)
    step4 = [r["step_s"] for r in rows if r["world_size"] == NODES]
    return {"kills": kills, "stops": stops, "step_s_4": statistics.median(step4) if step4 else None}


# --------------------------------------------------------------------------- torchrun
class TorchrunSide:
    """4 plain torchrun agents (`python -m torch.distributed.run`) running the DCP trainer."""

    def __init__(self, run: str, variant: str, rejoin_after_s: float, dcp_every: int) -> None:
        self.run = run
        self.variant = variant
        self.name = f"torchrun {variant}"
        self.rejoin_after_s = rejoin_after_s
        self.dcp_every = dcp_every
        self.port = free_port()
        self.store: Any = None
        self.procs: dict[int, subprocess.Popen] = {}
        self.rejoin_at: dict[int, float] = {}
        self.run_id = f"bench-{os.getpid()}-{int(time.time())}"

    def start(self) -> None:
        os.makedirs(os.path.join(self.run, "logs"), exist_ok=True)
        if self.variant == "tuned":
            import torch.distributed as dist

            self.store = dist.TCPStore("127.0.0.1", self.port, is_master=True, multi_tenant=True, wait_for_workers=False)
        for j in range(NODES):
            self._start(j)
            if j == 0 and self.variant == "defaults":
                time.sleep(2.0)  # agent 0 hosts the store: it goes first

    def _start(self, j: int) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", f"{NODES - 1}:{NODES}", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", self.run_id,
               "--max-restarts", "1000", "--local-addr", "127.0.0.1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if self.variant == "tuned":
            cmd += ["--rdzv-conf", "is_host=false,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"]
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        cmd += [os.path.join(HERE, "_torchrun_dcp_trainer.py"), "--run-dir", self.run, "--every", str(self.dcp_every),
                "--global-batch", str(BATCH)]
        logf = open(os.path.join(self.run, "logs", f"node{j}.log"), "ab")  # noqa: SIM115 - lives with the agent
        self.procs[j] = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env, start_new_session=True)

    def poll(self) -> None:
        now = time.monotonic()
        for j, at in list(self.rejoin_at.items()):
            if now >= at:
                del self.rejoin_at[j]
                self._start(j)
                log(f"{self.name}: node {j} is back")

    def kill(self, node: int, *, stop: bool = False) -> float:
        p = self.procs[node]
        workers = _children(p.pid)
        t = time.time()
        for pid in [p.pid, *workers]:  # the whole node: torchrun's workers run in their own sessions
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        self.rejoin_at[node] = time.monotonic() + self.rejoin_after_s
        return t

    def up(self, node: int) -> bool:
        return node not in self.rejoin_at and self.procs[node].poll() is None

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                for pid in [p.pid, *_children(p.pid)]:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait()


def _restarts(run: str) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(run, "restarts.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def torchrun_samples(args: argparse.Namespace, work: str, variant: str, samples: int) -> dict[str, Any]:
    run = os.path.join(work, f"tr-{variant}-a")
    side = TorchrunSide(run, variant, args.rejoin_after, args.dcp_every)
    side.start()
    kills = []
    try:
        for i in range(samples):
            if not _wait(lambda: _stable_at(run, NODES, args.warm_steps), args.torchrun_wait, side.poll):
                log(f"{side.name}: the job did not reach 4 nodes again; stopping the samples here")
                break
            node = 1 + i % (NODES - 1)  # never node 0: with the defaults it hosts the store
            t = side.kill(node)
            log(f"{side.name}: killed node {node}")
            rs = None

            def done(t: float = t) -> bool:
                nonlocal rs
                rs = next((r for r in _restarts(run) if r["process"] > t), None)
                return rs is not None

            if not _wait(done, args.torchrun_wait, side.poll):
                log(f"{side.name}: no restarted step within {args.torchrun_wait:.0f} s")
                kills.append({"mttr_s": None, "timed_out": True})
                continue
            rec = {"mttr_s": rs["first_step"] - t, "restored_step": rs["restored_step"], "world_size": rs["world_size"],
                   "phases": {
                       "detect_rendezvous_s": max(0.0, rs["process"] - t),
                       "start_s": rs["built"] - rs["process"],
                       "restore_s": rs["restored"] - rs["built"],
                       "first_step_s": rs["first_step"] - rs["restored"],
                   }}
            last_before = max((r["step"] for r in _rows(run) if r["time"] <= t), default=0)
            rec["lost_steps"] = max(0, last_before - rs["restored_step"])
            kills.append(rec)
            log(f"{side.name}: first step at {rec['world_size']} nodes {rec['mttr_s']:.2f} s after the kill")
    finally:
        side.stop()
    return {"kills": kills}


# --------------------------------------------------------------------------- ETTR
def ettr(run: str, t_end: float) -> dict[str, Any]:
    """Time in the steps that count / wall time, from the first step to `t_end`."""
    rows = [r for r in _rows(run) if r["time"] <= t_end]
    if not rows:
        return {"ettr": 0.0, "steps": 0}
    final: dict[int, dict[str, Any]] = {}
    for r in rows:
        final[r["step"]] = r
    kept = [final[s] for s in sorted(final)]
    t0 = rows[0]["time"] - rows[0]["step_s"]
    useful = sum(r["step_s"] for r in kept)
    return {"ettr": useful / (t_end - t0), "steps": len(kept), "wall_s": t_end - t0, "useful_s": useful,
            "executed_steps": len(rows), "curve": [(round(r["time"] - t0, 3), r["step"], r["world_size"]) for r in rows]}


def ettr_run(args: argparse.Namespace, work: str, which: str) -> dict[str, Any]:
    run = os.path.join(work, f"{which}-b")
    side: Any = ElastickitSide(run, args.rejoin_after) if which == "elastickit" else TorchrunSide(
        run, which.split()[-1], args.rejoin_after, args.dcp_every)
    side.start()
    kills = []
    try:
        if not _wait(lambda: len(_rows(run)) > 0, 300, side.poll):
            raise RuntimeError(f"{which}: no step within 300 s")
        t_first = _rows(run)[0]["time"]
        t_end = t_first + args.ettr_minutes * 60
        schedule = [t_first + args.first_kill + k * args.kill_every for k in range(1000)]
        schedule = [t for t in schedule if t < t_end - 5]
        i = 0
        while time.time() < t_end:
            side.poll()
            if i < len(schedule) and time.time() >= schedule[i]:
                node = 1 + i % (NODES - 1)
                if side.up(node):
                    side.kill(node)
                    kills.append(time.time())
                    log(f"{which}: killed node {node} (ETTR run)")
                i += 1
            time.sleep(0.05)
    finally:
        side.stop()
    out = ettr(run, t_end)
    out["kills"] = len(kills)
    out["recoveries"] = _events(run) if which == "elastickit" else []
    log(f"{which}: ETTR {out['ettr']:.3f}, {out['steps']} steps in {out.get('wall_s', 0):.0f} s")
    return out


# --------------------------------------------------------------------------- report
def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    ek = results["a"]["elastickit"]
    rows: list[list[Any]] = []
    phase_keys = ["detect_s", "abort_s", "rendezvous_s", "start_s", "restore_s", "first_step_s"]
    for label, recs in (("elastickit, node killed", ek["kills"]), ("elastickit, node hung (SIGSTOP)", ek["stops"])):
        if recs:
            med = {k: _med([r["phases"][k] for r in recs]) for k in phase_keys}
            rows.append([label, len(recs), _fmt(_med([r["mttr_s"] for r in recs])),
                         " / ".join(_fmt(med[k]) for k in phase_keys), _fmt(_med([r["lost_steps"] for r in recs]), 1),
                         ", ".join(_fmt(r["mttr_s"]) for r in recs)])
    for variant in ("tuned", "defaults"):
        tr = results["a"].get(f"torchrun {variant}")
        if not tr:
            continue
        ok = [r for r in tr["kills"] if r.get("mttr_s") is not None]
        phases = [r["phases"] for r in ok if "phases" in r]
        ph = (f"{_fmt(_med([p['detect_rendezvous_s'] for p in phases]))} (detect+abort+rendezvous) / "
              f"{_fmt(_med([p['start_s'] for p in phases]))} / {_fmt(_med([p['restore_s'] for p in phases]))} / "
              f"{_fmt(_med([p['first_step_s'] for p in phases]))}") if phases else "-"
        timeouts = sum(1 for r in tr["kills"] if r.get("timed_out"))
        rows.append([f"torchrun elastic + DCP, {variant}", len(tr["kills"]), _fmt(_med([r["mttr_s"] for r in ok])), ph,
                     _fmt(_med([r.get("lost_steps") for r in ok]), 1),
                     ", ".join(_fmt(r["mttr_s"]) for r in ok) + (f" ({timeouts} timed out)" if timeouts else "")])
    notes = [
        f"Machine: {machine()}; 1-minute load average {results['load_start']:.1f} at the start, "
        f"{results.get('load_end', os.getloadavg()[0]):.1f} at the end (a shared machine)" + (" -- a --quick run" if args.quick else "") + ".",
        f"Model `tiny` (FSDP2, AdamW), global batch {BATCH} in microbatches of 2, 4 simulated nodes x 1 worker; "
        f"a node comes back {args.rejoin_after:.0f} s after each kill. DCP saves every {args.dcp_every} steps.",
        "Phases (elastickit): detect / abort / rendezvous / start (rebuild in-process) / restore / first step. "
        "torchrun: kill -> the restarted worker process exists (detection, stop, re-rendezvous) / imports + "
        "init + build / DCP load / first step.",
    ]
    sr = results.get("stop_run")
    hang_step = sr["step_s_4"] if sr is not None else ek.get("step_s_4")
    notes.append(f"Median step time at 4 nodes (elastickit run of the kills): {_fmt(ek.get('step_s_4'), 3)} s; the hang "
                 f"target is 2 x step time + 2 s = {_fmt(2 * hang_step + 2 if hang_step else None)} s"
                 + (f" (step time of the SIGSTOP run: {_fmt(hang_step, 3)} s)." if sr is not None else "."))
    for kind, label in (("kill", "SIGKILL"), ("stop", "SIGSTOP")):
        r = results.get(f"{kind}_run")
        if r is not None:
            notes.append(f"The {label} row comes from a run of its own (`--only {kind}`, {r['time']}, {r['samples']} "
                         f"samples): median step time at 4 nodes {_fmt(r['step_s_4'], 3)} s; 1-minute load average "
                         f"{r['load_start']:.1f} at its start, {r['load_end']:.1f} at its end.")
    b = results.get("b") or {}
    ettr_rows = []
    for which, r in b.items():
        ettr_rows.append(f"| {which} | {r['ettr'] * 100:.1f}% | {r['steps']} | {r.get('wall_s', 0):.0f} | {r['kills']} |")
    md = write_table("recovery", "Recovery from a lost node: elastickit vs torchrun elastic + DCP",
                     ["system", "kills", "kill -> first step (median s)", "phases (median s)", "lost steps", "samples (s)"],
                     rows, notes, results)
    if ettr_rows:
        md += "\n".join([
            "", f"## ETTR over {args.ettr_minutes:.0f} min, a node killed every {args.kill_every:.0f} s and back "
            f"{args.rejoin_after:.0f} s later", "",
            "| system | ETTR | steps done | wall (s) | kills |", "|---|---|---|---|---|", *ettr_rows, "",
            "ETTR = time in the steps that count (the last execution of each step) / wall time from the first step.", ""])
        with open(os.path.join(RESULTS, "recovery.md"), "w") as f:
            f.write(md)
    _plot(results)
    print(md)


def _plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    labels, stacks = [], []
    ek = results["a"]["elastickit"]
    keys = ["detect_s", "abort_s", "rendezvous_s", "start_s", "restore_s", "first_step_s"]
    for label, recs in (("elastickit\nkill", ek["kills"]), ("elastickit\nSIGSTOP", ek["stops"])):
        if recs:
            labels.append(label)
            stacks.append([_med([r["phases"][k] for r in recs]) or 0.0 for k in keys])
    for variant in ("tuned", "defaults"):
        tr = results["a"].get(f"torchrun {variant}")
        phases = [r["phases"] for r in (tr or {}).get("kills", []) if "phases" in r]
        if phases:
            labels.append(f"torchrun+DCP\n{variant}")
            stacks.append([_med([p["detect_rendezvous_s"] for p in phases]) or 0.0, 0.0, 0.0,
                           _med([p["start_s"] for p in phases]) or 0.0, _med([p["restore_s"] for p in phases]) or 0.0,
                           _med([p["first_step_s"] for p in phases]) or 0.0])
    bottom = [0.0] * len(labels)
    colors = ["#d62", "#e94", "#eb5", "#6a5", "#48c", "#86b"]
    names = ["detect (torchrun: detect + abort + rendezvous)", "abort", "rendezvous", "start", "restore", "first step"]
    for k in range(len(keys)):
        vals = [s[k] for s in stacks]
        ax.bar(labels, vals, bottom=bottom, color=colors[k], label=names[k])
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    for x, top in enumerate(bottom):
        ax.text(x, top, f"{top:.1f} s", ha="center", va="bottom")
    ax.set_ylabel("seconds (median)")
    ax.set_title("kill -> first step on the new layout")
    ax.legend(fontsize=7)
    ax = axes[1]
    for which, r in (results.get("b") or {}).items():
        curve = r.get("curve") or []
        if curve:
            final: dict[int, float] = {}
            for t, step, _w in curve:
                final[step] = t
            pts = sorted(final.items())
            ax.plot([t for _, t in pts], [s for s, _ in pts], label=f"{which} (ETTR {r['ettr'] * 100:.1f}%)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("step (final trajectory)")
    ax.set_title("progress with a node killed periodically")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "recovery.png"), dpi=110)
    plt.close(fig)


def only_run(args: argparse.Namespace, work: str) -> None:
    """`--only stop` (or `kill`): those samples alone, in a run of their own; they replace that row
    (and its step time and load) in results/recovery.json, and the report is redone from it."""
    path = os.path.join(RESULTS, "recovery.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        results = {"args": vars(args), "a": {}, "b": {}, "load_start": os.getloadavg()[0]}
    kind = args.only
    load_start = os.getloadavg()[0]
    n = args.stop_samples if kind == "stop" else args.samples
    log(f"elastickit: {n} {'SIGSTOP' if kind == 'stop' else 'SIGKILL'}s only (1-minute load {load_start:.2f})")
    got = elastickit_samples(argparse.Namespace(**{**vars(args), "samples": 0 if kind == "stop" else n,
                                                   "stop_samples": n if kind == "stop" else 0}), work)
    ek = results["a"].setdefault("elastickit", {"kills": [], "stops": [], "step_s_4": None})
    ek["stops" if kind == "stop" else "kills"] = got["stops" if kind == "stop" else "kills"]
    results[f"{kind}_run"] = {"step_s_4": got["step_s_4"], "load_start": load_start, "load_end": os.getloadavg()[0],
                              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "samples": n}
    log(f"1-minute load {results[f'{kind}_run']['load_end']:.2f} at the end")
    report(results, argparse.Namespace(**results["args"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 samples, a 3-minute ETTR run, no torchrun defaults")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--stop-samples", type=int, default=3)
    p.add_argument("--defaults-samples", type=int, default=5)
    p.add_argument("--rejoin-after", type=float, default=30.0)
    p.add_argument("--warm-steps", type=int, default=10)
    p.add_argument("--dcp-every", type=int, default=5)
    p.add_argument("--ettr-minutes", type=float, default=10.0)
    p.add_argument("--kill-every", type=float, default=120.0)
    p.add_argument("--first-kill", type=float, default=60.0)
    p.add_argument("--torchrun-wait", type=float, default=400.0)
    p.add_argument("--skip", action="append", default=[], choices=["defaults", "ettr", "torchrun"])
    p.add_argument("--report-only", action="store_true", help="redo the table and chart from results/recovery.json")
    p.add_argument("--only", choices=["stop", "kill"], help="only the SIGSTOP samples (--stop-samples of them), or "
                   "only the SIGKILL ones (--samples), in a run of their own: they replace that row of "
                   "results/recovery.json and .md, the other rows stay")
    p.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (node logs, events) instead of a temporary directory")
    args = p.parse_args()
    if args.report_only:
        with open(os.path.join(RESULTS, "recovery.json")) as f:
            results = json.load(f)
        report(results, argparse.Namespace(**results["args"]))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a TERM still stops every node
    if args.quick:
        args.samples, args.stop_samples, args.rejoin_after = 2, 1, 25.0
        args.ettr_minutes, args.kill_every, args.first_kill = 3.0, 60.0, 30.0
        args.skip.append("defaults")
    os.makedirs(RESULTS, exist_ok=True)
    work = args.keep or tempfile.mkdtemp(prefix="ek-bench-recovery-")
    os.makedirs(work, exist_ok=True)
    if args.only:
        try:
            only_run(args, work)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        return
    results: dict[str, Any] = {"args": vars(args), "a": {}, "b": {}, "load_start": os.getloadavg()[0]}
    try:
        log(f"(a) elastickit: {args.samples} kills, {args.stop_samples} SIGSTOPs")
        results["a"]["elastickit"] = elastickit_samples(args, work)
        if "torchrun" not in args.skip:
            log(f"(a) torchrun tuned: {args.samples} kills")
            results["a"]["torchrun tuned"] = torchrun_samples(args, work, "tuned", args.samples)
            if "defaults" not in args.skip:
                log(f"(a) torchrun defaults: {args.defaults_samples} kills")
                results["a"]["torchrun defaults"] = torchrun_samples(args, work, "defaults", args.defaults_samples)
        if "ettr" not in args.skip:
            for which in ("elastickit", *(() if "torchrun" in args.skip else ("torchrun tuned",))):
                log(f"(b) ETTR {which}: {args.ettr_minutes:.0f} min")
                results["b"][which] = ettr_run(args, work, which)
        results["load_end"] = os.getloadavg()[0]
        report(results, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
