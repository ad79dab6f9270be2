"""Training-loop blocking time per checkpoint, persist throughput and step-time overhead.

    .venv/bin/python benchmarks/bench_async.py [--gib-per-rank 1.0] [--repeats 3] [--skip-small]

1. Blocking time per checkpoint, 2 ranks (gloo), the same state for every method:
   - the trainer's `small` GPT (~100M parameters, dp=2 FSDP2, AdamW) after one real step;
   - a synthetic state of --gib-per-rank GiB per rank (parameters of an SGD optimizer).
   The second of two checkpoints is timed (steady state; the first allocates buffers and
   pools for every method). elastickit's blocking time is the time inside `save()` plus the time the next
   `optimizer.step()` waits at the fence after a real forward/backward (or, for the synthetic
   state, a compute phase of about the same length). torch.save (+fsync) and DCP save block for
   the whole write; DCP async_save blocks for its call (it stages a copy before returning).
2. Persist throughput of elastickit's persistent tier vs `dd oflag=direct` of the same bytes
   to the same disk (two writers at once, as two ranks write).
3. Step-time overhead of checkpointing every step of the `tiny` trainer (dp=2), with the default
   tiers (memory + persistent) and with the memory tier alone: segments with and without a save
   every step alternate in the same processes.

Writes results/async.md, results/async.json and results/async.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bar_chart, machine, spawn, write_table  # noqa: E402

METHODS = ["elastickit", "torch.save", "dcp.save", "dcp.async_save"]


def _compute(seconds: float) -> None:
    """Stand-in for a forward/backward of about `seconds` (real CPU work, GIL released)."""
    import torch

    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def _build(kind: str, rank: int, world: int, gib: float):
    import torch

    if kind == "small":
        from elastickit.trainer.loop import TrainConfig
        from elastickit.trainer.parallel import TrainLayout, build_mesh, loss_fn, parallelize

        cfg = TrainConfig(model="small", layout=f"dp={world}")
        layout = TrainLayout.parse(f"dp={world}")
        mesh = build_mesh(layout, "cpu")
        model = parallelize(cfg.model_config(), layout, mesh, seed=0, device=torch.device("cpu"), dp_mode="fsdp")
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
        vocab = cfg.model_config().vocab_size
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, vocab, (2, 64), generator=g)

        def fwd_bwd() -> None:
            optim.zero_grad()
            loss_fn(model(x), x).backward()

        return model, optim, fwd_bwd
    n = 8
    numel = int(gib * (1 << 30) / 4 / n)
    torch.manual_seed(rank)
    # Names unique to the rank (as pipeline stages have), so every rank writes its own GiB
    # instead of deduplicating into one replica.
    model = torch.nn.ParameterDict({f"r{rank}_{i}": torch.nn.Parameter(torch.randn(numel)) for i in range(n)})
    optim = torch.optim.SGD(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def fwd_bwd() -> None:
        _compute(1.5)

    return model, optim, fwd_bwd


def _blocking(rank: int, world: int, kind: str, method: str, gib: float, out: str) -> dict:
    """Two checkpoints; the second one is timed (steady state: buffers and pools warmed up)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import elastickit as ek

    model, optim, fwd_bwd = _build(kind, rank, world, gib)
    fwd_bwd()
    optim.step()  # a real step, so optimizer state exists
    dest = os.path.join(out, f"{kind}-{method}".replace(".", "_"))
    if rank == 0:
        shutil.rmtree(dest, ignore_errors=True)
    dist.barrier()
    state = {"model": model, "optim": optim}
    ck = ek.Checkpointer(dest, rng=False) if method == "elastickit" else None
    group = dist.new_group(backend="gloo") if method == "dcp.async_save" else None
    stats: dict = {}
    for step in (1, 2):
        dist.barrier()
        t0 = time.perf_counter()
        if method == "elastickit":
            handle = ck.save(step, state)
            in_save = time.perf_counter() - t0
            fwd_bwd()  # the next step's compute overlaps the copy
            t1 = time.perf_counter()
            ck.fence()  # what optimizer.step() would wait for
            fence = time.perf_counter() - t1
            blocking = in_save + fence
            optim.step()
            handle.durable.result()
            stats.update(in_save_s=in_save, fence_s=fence, durable_after_s=time.perf_counter() - t0)
        elif method == "torch.save":
            msd, osd = get_state_dict(model, optim)
            os.makedirs(dest, exist_ok=True)
            path = os.path.join(dest, f"rank{rank}-{step}.pt")
            torch.save({"model": msd, "optim": osd}, path)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            blocking = time.perf_counter() - t0
            fwd_bwd()
            optim.step()
        elif method == "dcp.save":
            msd, osd = get_state_dict(model, optim)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(dest, str(step)))
            blocking = time.perf_counter() - t0
            fwd_bwd()
            optim.step()
        else:
            msd, osd = get_state_dict(model, optim)
            fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(dest, str(step)), process_group=group)
            blocking = time.perf_counter() - t0
            fwd_bwd()
            optim.step()
            (fut.result() if hasattr(fut, "result") else fut.upload_completion.result())
            stats["durable_after_s"] = time.perf_counter() - t0
        if step == 1:
            stats["first_blocking_s"] = blocking
    if ck is not None:
        ck.close()
    dist.barrier()
    return {"blocking_s": blocking, **stats}


def _persist(rank: int, world: int, gib: float, out: str) -> dict:
    import torch  # noqa: F401
    import torch.distributed as dist
    from elastickit.checkpoint.events import read_events

    import elastickit as ek

    model, optim, _ = _build("synthetic", rank, world, gib)
    dest = os.path.join(out, "persist")
    if rank == 0:
        shutil.rmtree(dest, ignore_errors=True)
    dist.barrier()
    with ek.Checkpointer(dest, rng=False) as ck:
        ck.save(1, {"model": model}).durable.result()
    dist.barrier()
    rec = [r for r in read_events(os.path.join(dest, "events.jsonl")) if r["type"] == "checkpoint"] if rank == 0 else []
    return {"persist_s": rec[0]["tiers"]["persistent"]["persist_s"] if rec else None,
            "stored_bytes": rec[0]["tiers"]["persistent"]["stored_bytes"] if rec else None}


def _dd(out: str, gib: float, writers: int) -> float:
    """Seconds for `writers` concurrent `dd oflag=direct` of gib GiB each."""
    count = int(gib * 1024 / 64)
    procs = []
    t0 = time.perf_counter()
    for i in range(writers):
        procs.append(subprocess.Popen(
            ["dd", "if=/dev/zero", f"of={os.path.join(out, f'dd{i}')}", "bs=64M", f"count={count}", "oflag=direct"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait()
    dt = time.perf_counter() - t0
    for i in range(writers):
        os.remove(os.path.join(out, f"dd{i}"))
    return dt


def _overhead(rank: int, world: int, ckpt: str, tiers_name: str, seg: int, rounds: int) -> dict:
    """Step times of the tiny trainer, alternating segments without and with a save every step.

    One process for both conditions (paired): the machine's drift hits both alike. Segments of
    `seg` steps; the first 3 steps of a segment and the first round are warm-up; the tiers are
    flushed (`wait`) between segments, outside the timing.
    """
    from elastickit.checkpoint.tiers import Tiers

    import elastickit as ek
    from elastickit.trainer.loop import TrainConfig, build_job
    from elastickit.trainer.rules import model_rules, parallel_layout

    cfg = TrainConfig(model="tiny", layout=f"dp={world}", steps=10**6, ckpt_dir=ckpt, ckpt_every=1)
    job = build_job(cfg)
    state = job.state()
    tiers = Tiers() if tiers_name == "default" else Tiers(persistent=None)
    ck = ek.Checkpointer(ckpt, every=1, tiers=tiers, layout=parallel_layout(job.layout),
                         rules=model_rules(cfg.model_config()))
    times: dict[str, list[float]] = {"off": [], "on": []}
    step = 0
    for r in range(rounds + 1):
        for mode in ("off", "on"):
            for i in range(seg):
                t0 = time.perf_counter()
                job.train_step(step)
                step += 1
                if mode == "on":
                    ck.save(step, state)
                if r > 0 and i >= 3:
                    times[mode].append(time.perf_counter() - t0)
            if mode == "on":
                ck.wait()
    ck.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib-per-rank", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segment", type=int, default=20, help="tiny-trainer steps per on/off segment")
    ap.add_argument("--rounds", type=int, default=10, help="on/off segment pairs timed")
    ap.add_argument("--skip-small", action="store_true", help="leave out the ~100M-parameter model")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ekbench_async"))
    ap.add_argument("--skip-blocking", action="store_true", help="reuse the blocking figures of results/async.json")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    world = 2
    kinds = (["small"] if not args.skip_small else []) + ["synthetic"]
    data: dict = {"blocking": {}, "args": vars(args)}
    rows = []
    previous = {}
    if args.skip_blocking:
        import json

        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "async.json")) as f:
            previous = json.load(f)["blocking"]
    for kind in kinds:
        res = {m: [] for m in METHODS}
        for rep in range(0 if args.skip_blocking else args.repeats):
            for m in METHODS:
                r = spawn(_blocking, world, kind, m, args.gib_per_rank, args.dir)
                res[m].append(max(x["blocking_s"] for x in r))
                print(f"{kind} rep {rep} {m:15s} blocking {res[m][-1]:.3f} s", flush=True)
        if args.skip_blocking:
            res = previous[kind]
        data["blocking"][kind] = res
        med = {m: statistics.median(v) for m, v in res.items()}
        for m in METHODS:
            rows.append([kind, m, f"{med[m]:.4f}", f"{med[m] / med['torch.save']:.3f}", f"{med[m] / med['dcp.async_save']:.3f}"])
    # Persist throughput vs dd.
    pr = spawn(_persist, world, args.gib_per_rank, args.dir)[0]
    dd_s = statistics.median(_dd(args.dir, args.gib_per_rank, world) for _ in range(args.repeats))
    total = world * args.gib_per_rank * (1 << 30)
    ek_gbs = pr["stored_bytes"] / pr["persist_s"] / 1e9
    dd_gbs = total / dd_s / 1e9
    data["persist"] = {"elastickit_s": pr["persist_s"], "elastickit_bytes": pr["stored_bytes"], "dd_s": dd_s, "dd_bytes": total}
    # Step-time overhead of checkpointing every step: default tiers (memory + persistent) and
    # the memory tier alone, each paired with steps without checkpoints in the same processes.
    overhead = {}
    for tiers_name in ("default", "memory"):
        ck_dir = os.path.join(args.dir, f"overhead-{tiers_name}")
        shutil.rmtree(ck_dir, ignore_errors=True)
        r = spawn(_overhead, world, ck_dir, tiers_name, args.segment, args.rounds)
        n = len(r[0]["off"])
        # A step takes as long as its slowest rank; medians over all timed steps.
        off = statistics.median(max(x["off"][i] for x in r) for i in range(n))
        on = statistics.median(max(x["on"][i] for x in r) for i in range(n))
        overhead[tiers_name] = {"no_ckpt_step_s": off, "ckpt_every_step_s": on, "steps": n}
        print(f"overhead {tiers_name}: {off * 1000:.1f} ms -> {on * 1000:.1f} ms ({(on / off - 1) * 100:+.1f}%)", flush=True)
    data["overhead"] = overhead
    shutil.rmtree(args.dir, ignore_errors=True)
    notes = [
        f"Machine: {machine()}; 2 ranks (gloo); median of {args.repeats} interleaved runs; fresh processes per run.",
        "Blocking = time the training loop is stopped by the checkpoint (elastickit: inside save() + the fence "
        "before the next optimizer step, after the next forward/backward ran).",
        f"Persist throughput, persistent tier, {world} x {args.gib_per_rank:g} GiB: elastickit {ek_gbs:.2f} GB/s "
        f"vs dd oflag=direct {dd_gbs:.2f} GB/s = **{ek_gbs / dd_gbs:.2f}x** (target >= 0.8x).",
        *(
            f"Checkpointing every step of the tiny trainer (dp=2, {name} tiers): median step "
            f"{o['no_ckpt_step_s'] * 1000:.1f} ms without, {o['ckpt_every_step_s'] * 1000:.1f} ms with = "
            f"**{(o['ckpt_every_step_s'] / o['no_ckpt_step_s'] - 1) * 100:+.1f}%** (target < 5%; "
            f"{o['steps']} steps each, alternating segments of {args.segment} in the same processes)."
            for name, o in overhead.items()
        ),
    ]
    md = write_table("async", "Blocking time per checkpoint", ["state", "method", "median blocking s", "x torch.save", "x dcp.async_save"], rows, notes, data)
    labels = [f"{r[0]}\n{r[1]}" for r in rows]
    bar_chart("async", "Blocking time per checkpoint (s, lower is better)", labels, [float(r[2]) for r in rows], "seconds")
    print(md)


if __name__ == "__main__":
    main()
