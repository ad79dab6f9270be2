"""Detection quality of the communication-anomaly monitor (elastickit.monitor), 4 gloo ranks.

    .venv/bin/python benchmarks/bench_monitor.py            # ~3-4 min on 2 cores
    .venv/bin/python benchmarks/bench_monitor.py --quick    # smoke run

The launcher hosts a TCPStore and runs the collector itself (so a crashed rank 0 cannot take
it down); 4 spawned ranks run a small hybrid loop (compute, a p2p ring as in pipelining, a
tp-pair all-reduce and a world all-reduce). Slow-rank, slow-link and clean cases are
*episodes* of one long-lived job (a fresh monitor, store prefix and collector per episode);
hang and crash need a fresh job each. Per case:

- detection latency: steps from the fault's onset to the first event naming it (the window
  the detector needed), and seconds from onset (the faulty rank stamps the onset in the store);
- localization: the first event of the fault's type names exactly the injected rank / link;
- false positives: any event in a clean episode, or an event blaming another rank;
- probe overhead: median step time of the same loop on plain gloo vs the probing backend
  with the monitor attached (two separate jobs).

Results: benchmarks/results/monitor.md and monitor.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from typing import Any

WORLD = 4
OPS_PER_STEP = 4  # per rank: one send, one recv, two all_reduce
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- workers
def _connect(port: int, job: str, rank: int, backend: str) -> tuple[Any, Any]:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend.startswith("ekmon_"):
        from elastickit.monitor import register_backend

        register_backend()
    tcp = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
    store = dist.PrefixStore(f"{job}/", tcp)
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    return store, None


def _step(rank: int, compute_s: float, pair: Any, x: Any, mat: Any) -> None:
    import torch
    import torch.distributed as dist

    t_end = time.perf_counter() + compute_s
    torch.mm(mat, mat)  # a little real work, then idle like a GPU-bound rank
    remaining = t_end - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
    ops = [
        dist.P2POp(dist.isend, x, (rank + 1) % WORLD),
        dist.P2POp(dist.irecv, torch.empty_like(x), (rank - 1) % WORLD),
    ]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    dist.all_reduce(x, group=pair)
    dist.all_reduce(x)
    x.fill_(1.0)


def _groups(rank: int) -> Any:
    import torch.distributed as dist

    # new_group is collective over the world: every rank creates both pair groups.
    g01 = dist.new_group([0, 1])
    g23 = dist.new_group([2, 3])
    return g01 if rank < 2 else g23


def _hooks_for(spec: str, rank: int) -> list[Any]:
    from elastickit.faults import build_step_hooks

    return build_step_hooks([spec], None, rank, WORLD) if spec else []


def episode_worker(rank: int, port: int, job: str, backend: str) -> None:
    """Long-lived rank: runs the episodes the launcher posts under <job>/ep/<k>/spec."""
    import elastickit.monitor as ekm
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    store, _ = _connect(port, job, rank, backend)
    pair = _groups(rank)
    x = torch.ones(1024)
    mat = torch.randn(64, 64)
    k = 0
    while True:
        spec = json.loads(store.get(f"ep/{k}/spec"))  # blocks until the launcher posts it
        if spec.get("stop"):
            break
        monitored = spec["monitor"]
        mon = (
            ekm.Monitor(
                store,
                rank=rank,
                world_size=WORLD,
                options=ekm.MonitorOptions(collector_rank=None, prefix=f"ekmon/{k}"),
            )
            if monitored
            else None
        )
        hooks = _hooks_for(spec["fault"], rank)
        times = []
        dist.barrier()
        for step in range(spec["steps"]):
            t0 = time.perf_counter()
            if mon is not None:
                mon.on_step_start(step)
            if step == spec["onset"] and rank == spec["fault_rank"]:
                store.set(f"ep/{k}/onset", json.dumps({"time": time.time(), "step": step}))
            for h in hooks:
                h.on_step_start(step if step >= spec["onset"] else -1)
            _step(rank, spec["compute_s"], pair, x, mat)
            dt = time.perf_counter() - t0
            times.append(dt)
            if mon is not None:
                mon.on_step_end(step, 0.0, dt)
        for h in hooks:
            h.close()
        if mon is not None:
            mon.close()
        store.set(f"ep/{k}/times/{rank}", json.dumps(times))
        dist.barrier()
        k += 1
    dist.barrier()
    os._exit(0)


def fault_worker(rank: int, port: int, job: str, backend: str, spec: dict[str, Any]) -> None:
    """One job with a hang or crash injected; the launcher's collector watches."""
    import elastickit.monitor as ekm
    import torch

    store, _ = _connect(port, job, rank, backend)
    pair = _groups(rank)
    x = torch.ones(1024)
    mat = torch.randn(64, 64)
    mon = ekm.Monitor(
        store,
        rank=rank,
        world_size=WORLD,
        options=ekm.MonitorOptions(collector_rank=None, prefix="ekmon/0"),
    )
    hooks = _hooks_for(spec["fault"], rank)
    try:
        for step in range(spec["steps"]):
            t0 = time.perf_counter()
            mon.on_step_start(step)
            if step == spec["onset"] and rank == spec["fault_rank"]:
                store.set("ep/0/onset", json.dumps({"time": time.time(), "step": step}))
            for h in hooks:
                h.on_step_start(step)
            _step(rank, spec["compute_s"], pair, x, mat)
            mon.on_step_end(step, 0.0, time.perf_counter() - t0)
    finally:
        mon.close()
    os._exit(0)


# ----------------------------------------------------------------------------- launcher
def _spawn(target: Any, args_for: Any) -> list[Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_for(r), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    return procs


def _reap(procs: list[Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _onset(store: Any, k: int) -> dict[str, Any] | None:
    key = f"ep/{k}/onset"
    return json.loads(store.get(key)) if store.check([key]) else None


def _score(
    kind: str, truth: tuple[int, ...], events: list[Any], onset: dict[str, Any] | None
) -> dict[str, Any]:
    typed = [e for e in events if e.type == kind]
    first = typed[0] if typed else None
    wrong = [
        e.to_dict()
        for e in events
        if not (e.type == kind and tuple(e.ranks) == truth)
        and not (
            kind in ("hang", "crash") and e.type == "crash" and set(e.ranks) - set(truth) == set()
        )
    ]
    out: dict[str, Any] = {
        "detected": first is not None,
        "localized": bool(first and tuple(first.ranks) == truth),
        "other_events": wrong,
    }
    if first is not None and onset is not None:
        out["latency_s"] = round(first.time_s - onset["time"], 3)
        if kind in ("slow_rank", "slow_link"):
            out["latency_steps"] = first.step - onset["step"] + 1
    return out


def run_episodes(
    port: int, tcp: Any, args: argparse.Namespace, rng: random.Random, backend: str
) -> dict[str, Any]:
    import elastickit.monitor as ekm
    import torch.distributed as dist

    job = "episodes"
    store = dist.PrefixStore(f"{job}/", tcp)
    procs = _spawn(episode_worker, lambda r: (r, port, job, backend))
    k = 0
    out: dict[str, list[Any]] = {"clean": [], "slow_rank": [], "slow_link": []}
    clean_step_times: list[float] = []

    def episode(
        fault: str, fault_rank: int, truth: tuple[int, ...], kind: str, steps: int, onset: int
    ) -> None:
        nonlocal k
        col = ekm.Collector(
            store, world_size=WORLD, prefix=f"ekmon/{k}", poll_s=0.05, on_abort=None
        )
        col.start()
        store.set(
            f"ep/{k}/spec",
            json.dumps(
                {
                    "fault": fault,
                    "fault_rank": fault_rank,
                    "onset": onset,
                    "steps": steps,
                    "compute_s": args.compute_s,
                    "monitor": True,
                }
            ),
        )
        while not all(store.check([f"ep/{k}/times/{r}"]) for r in range(WORLD)):
            if not any(p.is_alive() for p in procs):
                raise RuntimeError("the benchmark's ranks died")
            time.sleep(0.05)
        col.close(final_wait_s=0.2)
        times = [json.loads(store.get(f"ep/{k}/times/{r}")) for r in range(WORLD)]
        step_med = statistics.median(t for ts in times for t in ts[1:])
        if kind == "clean":
            clean_step_times.append(step_med)
            out["clean"].append(
                {"events": [e.to_dict() for e in col.events], "step_time_s": round(step_med, 4)}
            )
        else:
            res = _score(kind, truth, col.events, _onset(store, k))
            res.update(fault=fault, step_time_s=round(step_med, 4))
            out[kind].append(res)
        k += 1

    try:
        for _ in range(args.clean):
            episode("", -1, (), "clean", args.steps, 10**9)
        base = statistics.median(clean_step_times)
        slow_ms = round(args.slow_share * base * 1000, 1)
        for _ in range(args.repeats):
            r = rng.randrange(WORLD)
            episode(f"slow:rank={r}:ms={slow_ms}", r, (r,), "slow_rank", args.steps, args.onset)
        for _ in range(args.repeats):
            a = rng.randrange(WORLD)
            b = (a + 1) % WORLD
            episode(
                f"slowlink:src={a}:dst={b}:ms={args.link_ms}",
                a,
                tuple(sorted((a, b))),
                "slow_link",
                args.steps,
                args.onset,
            )
        store.set(f"ep/{k}/spec", json.dumps({"stop": True}))
    finally:
        _reap(procs)
    return {"episodes": out, "clean_step_time_s": round(base, 4), "slow_ms": slow_ms}


def run_fault_job(
    port: int,
    tcp: Any,
    job: str,
    fault: str,
    fault_rank: int,
    kind: str,
    args: argparse.Namespace,
    backend: str,
) -> dict[str, Any]:
    import elastickit.monitor as ekm
    import torch.distributed as dist

    store = dist.PrefixStore(f"{job}/", tcp)
    aborted: list[Any] = []
    col = ekm.Collector(
        store,
        world_size=WORLD,
        prefix="ekmon/0",
        poll_s=0.05,
        abort_on_hang=True,
        on_abort=aborted.append,
    )
    col.start()
    spec = {
        "fault": fault,
        "fault_rank": fault_rank,
        "onset": args.onset,
        "steps": 10**6 if kind == "hang" else 60,
        "compute_s": args.compute_s,
    }
    procs = _spawn(fault_worker, lambda r: (r, port, job, backend, spec))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if kind == "hang" and aborted:
            break
        if kind == "crash" and any(e.type == "crash" for e in col.events):
            break
        if not any(p.is_alive() for p in procs):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    col.close(final_wait_s=0.5)
    _reap(procs, timeout_s=5)
    res = _score(kind, (fault_rank,), col.events, _onset(store, 0))
    res.update(fault=fault, aborted=bool(aborted), exit_codes=[p.exitcode for p in procs])
    return res


def run_overhead(port: int, tcp: Any, args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """Median step time of the same loop: plain gloo vs probing backend + monitor."""
    import torch.distributed as dist

    out = {}
    plan = []
    for i in range(args.overhead_pairs):
        plan += [
            (f"gloo{i}", "gloo", False),
            (f"probes{i}", backend, False),
            (f"probed{i}", backend, True),
        ]
    for label, be, monitored in plan:
        job = f"overhead-{label}"
        store = dist.PrefixStore(f"{job}/", tcp)
        procs = _spawn(episode_worker, lambda r, job=job, be=be: (r, port, job, be))
        store.set(
            "ep/0/spec",
            json.dumps(
                {
                    "fault": "",
                    "fault_rank": -1,
                    "onset": 10**9,
                    "steps": args.overhead_steps,
                    "compute_s": args.compute_s,
                    "monitor": monitored,
                }
            ),
        )
        store.set("ep/1/spec", json.dumps({"stop": True}))
        _reap(procs, timeout_s=120)
        times = [json.loads(store.get(f"ep/0/times/{r}")) for r in range(WORLD)]
        per_step = [statistics.median(ts[i] for ts in times) for i in range(2, len(times[0]))]
        out[label] = {
            "median_step_s": round(statistics.median(per_step), 5),
            "mean_step_s": round(statistics.mean(per_step), 5),
        }
    plain = [out[f"gloo{i}"]["median_step_s"] for i in range(args.overhead_pairs)]
    probed = [out[f"probed{i}"]["median_step_s"] for i in range(args.overhead_pairs)]
    probes = [out[f"probes{i}"]["median_step_s"] for i in range(args.overhead_pairs)]
    out["probes_only_median_steps_s"] = probes
    out["probes_only_overhead_pct"] = round(
        100 * (statistics.mean(probes) - statistics.mean(plain)) / statistics.mean(plain), 2
    )
    out["plain_median_steps_s"] = plain
    out["probed_median_steps_s"] = probed
    out["overhead_pct"] = round(
        100 * (statistics.mean(probed) - statistics.mean(plain)) / statistics.mean(plain), 2
    )
    # run-to-run spread of the plain runs: overhead below it cannot be told from noise
    out["plain_spread_pct"] = round(100 * (max(plain) - min(plain)) / statistics.mean(plain), 2)
    return out


def _probe_cost_per_op(n: int = 20000) -> dict[str, float]:
    """Bookkeeping cost of one probed operation (enter + complete + drain), single process."""
    from elastickit.monitor.records import RingBuffer
    from elastickit.monitor.summary import summarize

    buf = RingBuffer()
    t0 = time.perf_counter()
    for i in range(n):
        p = buf.enter("allreduce", "0", (0, 1, 2, 3), -1, 4096, i, time.time())
        buf.complete(p, time.time(), True)
        if i % 100 == 99:
            summarize(buf.drain(), rank=0, step=i, time_s=0.0, step_time_s=0.1)
    return {"us_per_op": round(1e6 * (time.perf_counter() - t0) / n, 2)}


def _pct(xs: list[bool]) -> float:
    return round(100.0 * sum(xs) / len(xs), 1) if xs else float("nan")


def _stats(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    return f"{statistics.median(vals):.2f} (max {max(vals):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    ap.add_argument("--clean", type=int, default=20, help="clean episodes")
    ap.add_argument("--repeats", type=int, default=10, help="slow-rank and slow-link episodes each")
    ap.add_argument("--jobs", type=int, default=3, help="hang and crash jobs each")
    ap.add_argument("--steps", type=int, default=14, help="steps per episode")
    ap.add_argument("--onset", type=int, default=4, help="step at which the fault starts")
    ap.add_argument("--compute-s", type=float, default=0.06, help="compute time per step")
    ap.add_argument("--slow-share", type=float, default=0.3, help="slow rank: +share of step time")
    ap.add_argument("--link-ms", type=float, default=20.0, help="slow link: delay per transfer")
    ap.add_argument("--overhead-steps", type=int, default=80)
    ap.add_argument(
        "--overhead-pairs",
        type=int,
        default=2,
        help="rounds of (plain, probes only, probes + monitor) jobs",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.clean, args.repeats, args.jobs, args.overhead_steps = 3, 2, 1, 20
        args.overhead_pairs = 1

    import elastickit.monitor as ekm
    import torch.distributed as dist

    backend = ekm.register_backend()
    rng = random.Random(args.seed)
    tcp = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=120),
    )
    port = tcp.port
    t_start = time.time()
    load_start = os.getloadavg()[0]
    ep = run_episodes(port, tcp, args, rng, backend)
    print(f"episodes done in {time.time() - t_start:.0f} s", file=sys.stderr, flush=True)
    hangs, crashes = [], []
    for j in range(args.jobs):
        r = rng.randrange(WORLD)
        hangs.append(
            run_fault_job(
                port, tcp, f"hang{j}", f"hang:rank={r}:step={args.onset}", r, "hang", args, backend
            )
        )
        r = rng.randrange(WORLD)
        crashes.append(
            run_fault_job(
                port,
                tcp,
                f"crash{j}",
                f"crash:rank={r}:step={args.onset}",
                r,
                "crash",
                args,
                backend,
            )
        )
    print(f"fault jobs done in {time.time() - t_start:.0f} s", file=sys.stderr, flush=True)
    overhead = run_overhead(port, tcp, args, backend)
    overhead.update(_probe_cost_per_op())
    overhead["bookkeeping_pct"] = round(
        100 * overhead["us_per_op"] * 1e-6 * OPS_PER_STEP / ep["clean_step_time_s"], 3
    )
    elapsed = time.time() - t_start

    eps = ep["episodes"]
    step_s = ep["clean_step_time_s"]
    rows = []
    for kind, runs in (
        ("slow_rank", eps["slow_rank"]),
        ("slow_link", eps["slow_link"]),
        ("hang", hangs),
        ("crash", crashes),
    ):
        rows.append(
            {
                "fault": kind,
                "runs": len(runs),
                "detected_pct": _pct([r["detected"] for r in runs]),
                "localized_pct": _pct([r["localized"] for r in runs]),
                "latency_steps": _stats([r["latency_steps"] for r in runs if "latency_steps" in r]),
                "latency_s": _stats([r["latency_s"] for r in runs if "latency_s" in r]),
                "other_events": sum(len(r["other_events"]) for r in runs),
            }
        )
    clean_fp = sum(len(c["events"]) for c in eps["clean"])
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, torch {__import__('torch').__version__}, gloo, 4 ranks",
        "elapsed_s": round(elapsed, 1),
        "load_average_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "args": vars(args),
        "clean_step_time_s": step_s,
        "slow_rank_ms": ep["slow_ms"],
        "rows": rows,
        "clean_runs": len(eps["clean"]),
        "clean_false_positives": clean_fp,
        "overhead": overhead,
        "hang_bound_target_s": round(2 * step_s + 1.0, 3),
        "raw": {"episodes": eps, "hangs": hangs, "crashes": crashes},
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "monitor.json"), "w") as f:
        json.dump(summary, f, indent=1)
    lines = [
        "# Communication-anomaly monitor: detection quality",
        "",
        f"{summary['date']}; {summary['machine']}; `benchmarks/bench_monitor.py"
        f"{' --quick' if args.quick else ''}` ({elapsed:.0f} s; 1-min load average "
        f"{summary['load_average_1min'][0]} at start, {summary['load_average_1min'][1]} at end: "
        "the machine is shared).",
        f"Loop: {args.compute_s * 1000:.0f} ms compute, p2p ring (batch_isend_irecv), tp-pair and "
        f"world all_reduce; clean step time {step_s * 1000:.1f} ms. Slow rank: +{ep['slow_ms']} ms "
        f"per step (+{args.slow_share:.0%}); slow link: +{args.link_ms:.0f} ms per transfer; "
        f"faults start at step {args.onset}.",
        "",
        "| fault | runs | detected | localized | latency (steps from onset) | latency (s from onset) "
        "| other events |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['fault']} | {r['runs']} | {r['detected_pct']}% | {r['localized_pct']}% "
            f"| {r['latency_steps']} | {r['latency_s']} | {r['other_events']} |"
        )
    lines += [
        "",
        f"False positives over {len(eps['clean'])} clean runs: **{clean_fp}** events.",
        f"Hang target (2 x step time + 1 s): {summary['hang_bound_target_s']} s. "
        "Crash target: 1 s.",
        f"Probe overhead on step time: {overhead['overhead_pct']}% (median step, ms: plain gloo "
        f"{', '.join(f'{v * 1000:.2f}' for v in overhead['plain_median_steps_s'])}; probed + "
        f"monitor {', '.join(f'{v * 1000:.2f}' for v in overhead['probed_median_steps_s'])}; "
        f"probing backend without the monitor "
        f"{', '.join(f'{v * 1000:.2f}' for v in overhead['probes_only_median_steps_s'])} "
        f"({overhead['probes_only_overhead_pct']}%); "
        f"{args.overhead_pairs} rounds, interleaved; spread between plain runs "
        f"{overhead['plain_spread_pct']}%). Bookkeeping: {overhead['us_per_op']} us per probed "
        f"operation, i.e. {overhead['bookkeeping_pct']}% of the step at {OPS_PER_STEP} operations "
        "per step.",
        "",
        "Latency in steps counts the faulty steps the detector saw (its window needs 4 of 5). "
        "Hang latency runs from the moment the faulty rank stopped entering; the collector then "
        "aborted the job (abort-on-hang). Crash latency runs from just before `os._exit`. "
        "Raw per-run data: monitor.json.",
    ]
    with open(os.path.join(args.out, "monitor.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
