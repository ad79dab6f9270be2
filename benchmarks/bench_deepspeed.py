"""Benchmark: DeepSpeed ZeRO-3 checkpoint -> DeepSpeed universal format.

elastickit (`elastickit convert --from deepspeed --to deepspeed-universal`: one pass, no temp
files, neither DeepSpeed nor torch imported) against
`python -m deepspeed.checkpoint.ds_to_universal` (its defaults: 4 extract and 2 merge workers).
Both run as separate processes; the figures are wall seconds and the peak RSS of the whole
process tree (sampled every 20 ms, children included). The outputs are checked to be the same
files with equal tensors before anything is reported.

    .venv/bin/python benchmarks/bench_deepspeed.py [--params-m 48] [--repeat 2] [--work DIR]

writes benchmarks/results/deepspeed.md. Subcommands `make` (under torchrun) and `ours` are used
internally.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

NOTES = """## Notes

- Both tools write the same output (checked above): the per-parameter atoms, `zero/optimizer_state.pt`
  (which, as ds_to_universal makes it for ZeRO-3, carries rank 0's whole flat fp32 and Adam
  buffers) and copies of the model-states files: about 1.5x the source bytes.
- ds_to_universal extracts every fragment of every rank to a temporary file, then merges them
  (4 extract and 2 merge processes), under `import torch` and `import deepspeed` (about 2 s here
  before any work). elastickit imports neither: `reshard/adapters/ptfile.py` reads the ranks'
  `torch.save` zips with a restricted unpickler into numpy views of the mapped files and writes
  each atom as a `torch.save` zip whose tensor bytes go from the source files to the atom file
  inside the kernel (`copy_file_range`): the tensor data never passes through the process, so
  its memory is the Python/numpy baseline (about 50 MiB) whatever the checkpoint size.
- Like `torch.save` with `set_crc32_options(False)`, the atoms' tensor records carry no zip
  CRC-32 (`torch.load` does not check it); the small records (the pickle) do.
- On this shared 2-core machine the wall times move with the other jobs' load and disk traffic;
  the CPU column moves less.
- The engine table: elastickit's `save_checkpoint` returns after taking references (lazy) or
  after a host copy (eager); the files are written by background threads. On this 2-core CPU
  machine the training step itself runs on the same cores, so the background write slows the
  next step (the "next step extra" column) instead of hiding behind GPU work as it would on a
  GPU node.
- DeepSpeed 0.19.8 resuming from any universal checkpoint under ZeRO-3 with several optimizer
  groups copies group 0's hyperparameters into every group and gives every sub-group the same
  `step` tensor (Adam then advances it once per sub-group per step). The tests work around the
  second by giving each sub-group its own copy after `load_checkpoint`, and keep one weight decay.
"""
RESULTS = os.path.join(HERE, "results", "deepspeed.md")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return env


def make(out: str, params_m: int) -> None:
    """Under torchrun: train one step of a ~params_m M-parameter model with ZeRO-3 and save."""
    import deepspeed
    import torch
    from torch import nn

    deepspeed.init_distributed(dist_backend="gloo")
    width = 1024
    blocks = max(1, round(params_m * 1e6 / (4 * (width * width + width))))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4 * blocks)])
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": 3}, "steps_per_print": 10_000}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    loss = engine(torch.randn(1, width)).square().mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag="global_step1")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def engine_bench(out: str, params_m: int, result: str) -> None:
    """Under torchrun: DeepSpeed's save_checkpoint blocking time, default engine vs elastickit's.

    Per save: the wall time of `save_checkpoint` (what the training loop waits), the extra time
    of the next training step over a plain one (elastickit's fence before the optimizer step),
    and for elastickit the time until the checkpoint is durable (in the background).
    """
    import deepspeed
    import torch
    from torch import nn

    from elastickit.integrations.deepspeed_engine import install

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    width = 1024
    blocks = max(1, round(params_m * 1e6 / (4 * (width * width + width))))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(4 * blocks)])
    cfg = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
           "zero_optimization": {"stage": 3}, "steps_per_print": 10_000}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(1, width)

    def step() -> float:
        torch.distributed.barrier()
        t = time.perf_counter()
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t

    plain = min(step() for _ in range(3))
    rows: dict[str, list[dict[str, float]]] = {"default": [], "elastickit": [], "elastickit-eager": []}
    for name, runs in rows.items():
        # elastickit: copy in the background, fence before the next optimizer step (lazy);
        # elastickit-eager: copy before save_checkpoint returns, write in the background.
        ck_engine = None
        if name != "default":
            ck_engine = install(engine, lazy="always" if name == "elastickit" else "never")
        for i in range(2):
            torch.distributed.barrier()
            t = time.perf_counter()
            engine.save_checkpoint(os.path.join(out, name), tag=f"t{i}")
            blocking = time.perf_counter() - t
            next_step = step()
            durable = 0.0
            if ck_engine is not None:
                ck_engine.wait()
                durable = time.perf_counter() - t
            runs.append({"blocking_s": blocking, "next_step_extra_s": max(0.0, next_step - plain),
                               "durable_s": durable})
        if ck_engine is not None:
            ck_engine.cleanup()
    if rank == 0:
        with open(result, "w") as f:
            json.dump({"plain_step_s": plain, **rows}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def ours(src: str, dst: str) -> None:
    """One `elastickit convert` (the CLI, in a separate process so its RSS is its own), timed
    after the CLI's imports; the conversion's own imports (numpy) are inside the time."""
    from elastickit.cli.main import app

    t = time.perf_counter()
    app(["convert", src, dst, "--from", "deepspeed", "--to", "deepspeed-universal"], standalone_mode=False)
    print(f"CONVERT_S {time.perf_counter() - t:.4f}", file=sys.stderr)
    if "torch" in sys.modules:
        raise SystemExit("the conversion imported torch")


def theirs(src: str, dst: str) -> None:
    """ds_to_universal with its defaults, timed after its imports (a separate process)."""
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", "--input_folder", src, "--output_folder", dst]
    args = ds_to_universal.parse_arguments()
    t = time.perf_counter()
    ds_to_universal.main(args)
    print(f"CONVERT_S {time.perf_counter() - t:.4f}", file=sys.stderr)


def _measure(cmd: list[str]) -> tuple[float, int, float, float]:
    """Wall seconds, peak RSS (bytes), CPU seconds of the process tree started by `cmd`, and the
    seconds of the conversion itself (after interpreter start-up and imports)."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    err_file = tempfile.TemporaryFile()  # noqa: SIM115 - read back after the process ends
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err_file)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    err_file.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    convert_s = [float(line.split()[1]) for line in err.splitlines() if line.startswith("CONVERT_S ")]
    return seconds, peak, cpu, convert_s[-1] if convert_s else float("nan")


def _same_outputs(a: str, b: str) -> int:
    import torch

    files_a = sorted(os.path.relpath(p, a) for p in glob.glob(a + "/**", recursive=True) if os.path.isfile(p))
    files_b = sorted(os.path.relpath(p, b) for p in glob.glob(b + "/**", recursive=True) if os.path.isfile(p))
    if files_a != files_b:
        raise SystemExit(f"outputs differ in their file lists: {set(files_a) ^ set(files_b)}")
    for rel in files_a:
        if rel.endswith("model_states.pt"):
            continue
        x = torch.load(os.path.join(a, rel), weights_only=False, map_location="cpu")
        y = torch.load(os.path.join(b, rel), weights_only=False, map_location="cpu")
        if isinstance(x, torch.Tensor) and not torch.equal(x, y):
            raise SystemExit(f"{rel} differs")
        if isinstance(x, dict) and "param" in x and not torch.equal(x["param"], y["param"]):
            raise SystemExit(f"{rel} differs")
    return len(files_a)


def _engine_table(args: argparse.Namespace, work: str) -> list[str]:
    result = os.path.join(work, "engine.json")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    os.path.abspath(__file__), "engine", "--out", os.path.join(work, "engine_ckpt"),
                    "--params-m", str(args.params_m), "--result", result],
                   env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(result) as f:
        eng = json.load(f)
    lines = [
        "# DeepSpeed `save_checkpoint`: blocking time, default engine vs elastickit's engine",
        "",
        (f"The same model, ZeRO-3, 2 ranks ({args.params_m}M parameters); two saves per engine. Per save: "
        "wall time of `engine.save_checkpoint` on rank 0, the extra time of the next training step over a "
        f"plain step ({eng['plain_step_s']:.2f} s; for elastickit: the fence before the optimizer step and "
        "the background writes competing for the same cores), and for elastickit the time until the "
        "checkpoint is durable (in the background, overlapping the next step)."),
        "",
        "| engine | save | blocking s | next step extra s | blocking + extra s | durable after s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("default", "elastickit", "elastickit-eager"):
        for i, r in enumerate(eng[name]):
            total = r["blocking_s"] + r["next_step_extra_s"]
            durable = f"{r['durable_s']:.2f}" if name != "default" else "at return"
            lines.append(f"| {name} | {i} | {r['blocking_s']:.3f} | {r['next_step_extra_s']:.3f} | "
                         f"{total:.3f} | {durable} |")
    best = {n: min(r["blocking_s"] for r in eng[n]) for n in eng if n != "plain_step_s"}
    total = {n: min(r["blocking_s"] + r["next_step_extra_s"] for r in eng[n]) for n in best}
    lines += ["", (f"Blocking time of elastickit's engine: {best['elastickit'] / best['default']:.3f}x the "
                   f"default engine's (best of each); counting the fence in the next step, "
                   f"{total['elastickit'] / total['default']:.2f}x (lazy) and "
                   f"{total['elastickit-eager'] / total['default']:.2f}x (eager copy). elastickit writes "
                   "safetensors with checksums and fsync; the default engine's torch.save returns "
                   "once the bytes are in the page cache."), ""]
    return lines


def _du(path: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(path + "/**", recursive=True) if os.path.isfile(p))


def run(args: argparse.Namespace) -> None:
    work = args.work or tempfile.mkdtemp(prefix="bench_ds_")
    src_root = os.path.join(work, "ckpt")
    if not os.path.isdir(os.path.join(src_root, "global_step1")):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        os.path.abspath(__file__), "make", "--out", src_root, "--params-m", str(args.params_m)],
                       env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    src = os.path.join(src_root, "global_step1")
    size = _du(src)
    rows: dict[str, list[tuple[float, int, float, float]]] = {"elastickit": [], "ds_to_universal": []}
    for i in range(args.repeat):
        for name in ("ds_to_universal", "elastickit"):
            dst = os.path.join(work, f"out_{name}", "u")
            shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
            if name == "elastickit":
                cmd = [sys.executable, os.path.abspath(__file__), "ours", src, dst]
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "theirs", src, dst]
            rows[name].append(_measure(cmd))
            sec, rss, cpu, conv = rows[name][-1]
            print(f"run {i} {name}: {sec:.2f} s (conversion {conv:.2f} s), peak RSS {rss / 2**20:.0f} MiB, "
                  f"CPU {cpu:.2f} s", flush=True)
    num_files = _same_outputs(os.path.join(work, "out_ds_to_universal", "u"), os.path.join(work, "out_elastickit", "u"))
    best = {k: (min(r[0] for r in v), max(r[1] for r in v), min(r[2] for r in v), min(r[3] for r in v))
            for k, v in rows.items()}
    conv_ratio = best["ds_to_universal"][3] / best["elastickit"][3]
    speedup = best["ds_to_universal"][0] / best["elastickit"][0]
    cpu_ratio = best["ds_to_universal"][2] / best["elastickit"][2]
    rss_ratio = best["elastickit"][1] / best["ds_to_universal"][1]
    load = os.getloadavg()[0]
    import deepspeed
    import torch

    lines = [
        "# DeepSpeed ZeRO-3 checkpoint -> DeepSpeed universal format",
        "",
        (f"Source: ZeRO-3, fp32, 2 ranks, {args.params_m}M parameters in 1024x1024 linear layers, "
        f"{size / 2**30:.2f} GiB on disk ({src}). Output: {num_files} files, checked equal "
        "(file list and every fp32/exp_avg/exp_avg_sq tensor) between the two tools."),
        (f"Machine: {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, deepspeed "
        f"{deepspeed.__version__}; local disk, page cache warm after the first run. "
        f"Best wall time, least CPU time (user+sys, children included) and highest peak RSS (process "
        f"tree, sampled every 20 ms) over {args.repeat} runs each, alternating the tools. "
        f"Load average at the end: {load:.1f} (the machine is shared; wall times are noisy, CPU "
        "times less so)."),
        "",
        "| tool | wall s | conversion s (after imports) | CPU s | peak RSS (MiB) | all runs: wall s |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, (sec, rss, cpu, conv) in best.items():
        runs = ", ".join(f"{r[0]:.2f}" for r in rows[name])
        cmd = "`elastickit convert --to deepspeed-universal`" if name == "elastickit" else "`python -m deepspeed.checkpoint.ds_to_universal` (defaults)"
        lines.append(f"| {cmd} | {sec:.2f} | {conv:.2f} | {cpu:.2f} | {rss / 2**20:.0f} | {runs} |")
    lines += ["", (f"elastickit: {speedup:.1f}x faster (wall), {cpu_ratio:.1f}x less CPU, at "
              f"{rss_ratio:.2f}x the peak RSS; the conversion alone (after imports: the CLI for "
              f"elastickit, torch and deepspeed for ds_to_universal) is {conv_ratio:.1f}x faster."), ""]
    if not args.skip_engine:
        lines += _engine_table(args, work)
    lines += [NOTES, ("Reproduce: `.venv/bin/python benchmarks/bench_deepspeed.py --params-m "
              f"{args.params_m} --repeat {args.repeat}`."), ""]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(json.dumps({"speedup": speedup, "conversion_speedup": conv_ratio, "cpu_ratio": cpu_ratio, "rss_ratio": rss_ratio, "bytes": size}))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    en = sub.add_parser("engine")
    en.add_argument("--out", required=True)
    en.add_argument("--params-m", type=int, default=48)
    en.add_argument("--result", required=True)
    en.add_argument("--local_rank", type=int, default=None)
    mk = sub.add_parser("make")
    mk.add_argument("--out", required=True)
    mk.add_argument("--params-m", type=int, default=48)
    mk.add_argument("--local_rank", type=int, default=None)
    th = sub.add_parser("theirs")
    th.add_argument("src")
    th.add_argument("dst")
    ou = sub.add_parser("ours")
    ou.add_argument("src")
    ou.add_argument("dst")
    ap.add_argument("--params-m", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-engine", action="store_true", help="only the conversion benchmark")
    ap.add_argument("--work", default=None, help="keep the checkpoint and outputs here (reused if present)")
    args = ap.parse_args()
    if args.cmd == "make":
        make(args.out, args.params_m)
    elif args.cmd == "engine":
        engine_bench(args.out, args.params_m, args.result)
    elif args.cmd == "theirs":
        theirs(args.src, args.dst)
    elif args.cmd == "ours":
        ours(args.src, args.dst)
    else:
        run(args)


if __name__ == "__main__":
    main()
