"""The per-rank entry point behind `elastickit train` (run by torchrun on every rank).

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        -m elastickit.trainer.worker --layout dp=2,tp=2 --steps 20

Reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun, initialises the default process group
(the monitor's probing backend when `--monitor`, else NCCL on GPU or gloo on CPU), adds the
fault-injection / monitor hooks (`elastickit.faults.build_step_hooks`) when asked, runs
`run_training`, and prints one line per step on rank 0. Exit codes: 0 done, 1 bad data,
2 bad request (as the CLI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .loop import TrainConfig

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The worker's flags (the CLI passes them through)."""
    p = argparse.ArgumentParser(prog="elastickit.trainer.worker")
    p.add_argument("--layout", default="single")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dp-mode", default="fsdp", choices=("fsdp", "replicate"))
    p.add_argument("--pp-schedule", default="gpipe", choices=("gpipe", "1f1b"))
    p.add_argument("--ckpt", default=None)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--inject", action="append", default=[])
    p.add_argument("--events", default=None)
    p.add_argument("--collective-monitor", action="store_true", dest="monitor")
    p.add_argument("--result", default=None, help="rank 0 writes the TrainResult here as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the worker flags describe (ValueError for a bad value)."""
    from .loop import TrainConfig

    return TrainConfig(
        model=args.model,
        layout=args.layout,
        steps=args.steps,
        stop_after=args.stop_after,
        global_batch=args.global_batch,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        lr=args.lr,
        seed=args.seed,
        dp_mode=args.dp_mode,
        pp_schedule=args.pp_schedule,
        ckpt_dir=args.ckpt,
        ckpt_every=args.every,
    )


def _backend(monitor: bool) -> str:
    import torch
    import torch.distributed as dist

    base = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if not monitor:
        return base
    from elastickit.monitor import register_backend

    return register_backend()


def _step_hooks(args: argparse.Namespace, rank: int, world_size: int) -> list:
    if not args.inject and not args.events and not args.monitor:
        return []
    # Monitor events go under the run directory by default: the checkpoint root's event log,
    # where the `auto` interval policy learns the failure rate from them.
    events = args.events or os.path.join(args.ckpt or ".", "events.jsonl")
    from elastickit.faults import build_step_hooks

    return list(
        build_step_hooks(
            specs=list(args.inject), events_path=events, rank=rank, world_size=world_size
        )
    )


def run(args: argparse.Namespace) -> int:
    """Initialise the group, train, tear down; return the exit code."""
    import torch
    import torch.distributed as dist

    from .hooks import PrintHook
    from .loop import run_training
    from .preflight import plural

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cfg = config_from_args(args)
    layout = cfg.train_layout()
    if layout.world_size != world_size:
        raise ValueError(
            f"--layout {layout} needs {layout.world_size} ranks but {world_size} were started"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if "RANK" in os.environ:
        dist.init_process_group(backend=_backend(args.monitor))
    hooks = _step_hooks(args, rank, world_size)
    if rank == 0:
        mcfg = cfg.model_config()
        print(
            f"elastickit train: model {args.model} ({mcfg.num_params():,} params), layout {layout} "
            f"on {plural(world_size, 'rank')}, {args.steps} steps, global batch {cfg.global_batch}x{cfg.seq_len}",
            flush=True,
        )
        hooks.append(PrintHook(cfg.steps))
    result = run_training(cfg, hooks)
    if rank == 0:
        if result.losses:
            mean_s = sum(result.step_times_s) / len(result.step_times_s)
            resumed = f" (resumed from step {result.start_step})" if result.start_step else ""
            print(
                f"done: steps {result.start_step + 1}..{result.end_step}{resumed}, final loss "
                f"{result.losses[-1]:.6f}, mean step time {mean_s:.3f} s",
                flush=True,
            )
        else:
            print(
                f"done: nothing to do (restored at step {result.start_step} of {cfg.steps})",
                flush=True,
            )
        if args.result:
            with open(args.result, "w") as f:
                json.dump(
                    {
                        "start_step": result.start_step,
                        "end_step": result.end_step,
                        "losses": result.losses,
                        "step_times_s": result.step_times_s,
                        "layout": result.layout,
                        "num_params": result.num_params,
                    },
                    f,
                )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run, map errors to exit codes (1 bad data, 2 bad request)."""
    from elastickit.checkpoint.errors import ElastickitError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ElastickitError as e:
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except ValueError as e:
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
