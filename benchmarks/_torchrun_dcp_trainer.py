"""The baseline of bench_recovery.py: the same trainer as elastickit's, as a user would run it
under plain torchrun elastic with PyTorch DCP checkpoints.

    python -m torch.distributed.run --nnodes 3:4 ... benchmarks/_torchrun_dcp_trainer.py \\
        --run-dir RUN --steps 100000 --every 5

Every (re)start: init the default group from torchrun's environment, build the same model
(FSDP2 over dp = WORLD_SIZE, the same global batch through gradient accumulation), load the
newest DCP checkpoint (resharded by DCP: get_state_dict / dcp.load / set_state_dict), train,
`dcp.save` every `--every` steps. Rank 0 appends one line per step to RUN/steps.jsonl (the
same schema as elastickit's) and one `restart` line per start to RUN/restarts.jsonl with the
times the benchmark splits into phases.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # before the heavy imports: "worker start" counts them

import argparse
import json
import os


def _latest(root: str) -> tuple[int, str] | None:
    """The newest committed DCP checkpoint (its `.metadata` is written last)."""
    best = None
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("step-") and os.path.exists(os.path.join(root, name, ".metadata")):
            step = int(name[5:])
            if best is None or step > best[0]:
                best = (step, os.path.join(root, name))
    return best


def _append(path: str, record: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=24)
    p.add_argument("--micro-batch", type=int, default=2)
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from elastickit.trainer.loop import TrainConfig, build_job

    torch.set_num_threads(1)
    t_imported = time.time()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t_init = time.time()
    dp = world
    job = build_job(
        TrainConfig(model="tiny", layout=f"dp={dp}", steps=args.steps, global_batch=args.global_batch,
                    grad_accum=args.global_batch // (args.micro_batch * dp))
    )
    t_built = time.time()
    root = os.path.join(args.run_dir, "dcp")
    start = 0
    found = _latest(root)
    if found is not None:
        model_sd, optim_sd = get_state_dict(job.model, job.optimizer)
        state = {"model": model_sd, "optim": optim_sd, "data": job.loader.state_dict()}
        dcp.load(state, checkpoint_id=found[1])
        set_state_dict(job.model, job.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        job.loader.load_state_dict(state["data"])
        start = found[0]
    t_restored = time.time()
    steps_path = os.path.join(args.run_dir, "steps.jsonl")
    first = True
    for step in range(start, args.steps):
        first_sample = job.loader.sample_index
        t0 = time.perf_counter()
        loss = job.train_step(step)
        dt = time.perf_counter() - t0
        if rank == 0:
            _append(steps_path, {"step": step + 1, "loss": loss, "world_size": world, "layout": f"pp=1,dp={dp},tp=1",
                                 "grad_accum": job.cfg.grad_accum, "step_s": round(dt, 6), "time": time.time(),
                                 "samples": [first_sample, job.loader.sample_index]})
            if first:
                _append(os.path.join(args.run_dir, "restarts.jsonl"), {
                    "world_size": world, "restored_step": start, "process": T_PROCESS, "imported": t_imported,
                    "init": t_init, "built": t_built, "restored": t_restored, "first_step": time.time(),
                    "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                })
        first = False
        if (step + 1) % args.every == 0:
            model_sd, optim_sd = get_state_dict(job.model, job.optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd, "data": job.loader.state_dict()},
                     checkpoint_id=os.path.join(root, f"step-{step + 1:08d}"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
