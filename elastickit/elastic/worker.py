"""The elastic worker's entry point: `python -m elastickit.elastic.worker [TRAINER FLAGS]`.

Started by the elastickit agent (torchrun's elastic agent, `elastickit.elastic.agent`), one per
local rank. First thing, before the heavy imports, it asks the kernel to SIGKILL it when its
agent dies (PR_SET_PDEATHSIG): torchrun starts workers in their own sessions, so without it a
killed node's workers would train on as orphans. Then it runs `ElasticWorker` (in-process
recovery; see `elastickit.elastic.runtime`). Exit codes: 0 done, 1 bad data, 2 bad request.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ElasticConfig

__all__ = ["build_parser", "config_from", "die_with_parent", "main", "parse_flags"]

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """SIGKILL this process when its parent (the agent) dies; exit now if it already has.

    Returns False where prctl is not available (not Linux)."""
    expected = int(os.environ.get("ELASTICKIT_AGENT_PID", "0"))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected and os.getppid() != expected:
        os._exit(1)  # the agent died before the signal was armed
    return True


def build_parser() -> argparse.ArgumentParser:
    """The trainer flags (what `elastickit train --nodes` and `elastickit launch -- ...` pass)."""
    p = argparse.ArgumentParser(prog="elastickit.elastic.worker")
    p.add_argument("--run", default=None, help="run directory (required)")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--local-tier", default="")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--global-batch", type=int, default=24)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--layout", default="auto")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dp-mode", default="fsdp", choices=("fsdp", "replicate"))
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--hang-timeout", type=float, default=1.0)
    p.add_argument("--rank-memory-mib", type=float, default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--inject", action="append", default=[], help="hang:rank=R:step=S (a hung training loop)")
    return p


def config_from(args: argparse.Namespace) -> ElasticConfig:
    """The ElasticConfig of parsed worker flags (ValueError names a bad flag)."""
    from .config import ElasticConfig
    from .injection import parse_node_fault

    for text in args.inject:
        if parse_node_fault(text, nodes=1 << 30).kind != "hang":
            raise ValueError(f"--inject {text!r}: a worker injects only hang:rank=R:step=S (whole nodes are the supervisor's)")
    if not args.run:
        raise ValueError("--run is missing: give the run directory (steps.jsonl, events.jsonl, ckpt/)")
    return ElasticConfig(
        run=args.run,
        ckpt=args.ckpt,
        local_tier=args.local_tier,
        model=args.model,
        steps=args.steps,
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        layout=args.layout,
        lr=args.lr,
        seed=args.seed,
        dp_mode=args.dp_mode,
        every=args.every,
        hang_s=args.hang_timeout,
        rank_memory_mib=args.rank_memory_mib,
        step_sleep_s=args.step_sleep,
        inject=tuple(args.inject),
    )


def parse_flags(flags: Sequence[str]) -> ElasticConfig:
    """The ElasticConfig of trainer flags, checked before anything starts; RequestError names
    the bad flag in one sentence."""
    from elastickit.checkpoint.errors import RequestError
    from elastickit.trainer.model import CONFIGS

    p = build_parser()
    p.exit_on_error = False
    try:
        args, extra = p.parse_known_args(list(flags))
    except argparse.ArgumentError as e:
        raise RequestError(f"trainer flag {e.argument_name}: {e.message}") from None
    if extra:
        raise RequestError(
            f"unknown trainer flag {extra[0]!r}; `python -m elastickit.elastic.worker --help` lists them"
        )
    if args.model not in CONFIGS:
        raise RequestError(f"--model {args.model!r} is unknown; choose one of {', '.join(CONFIGS)}")
    try:
        return config_from(args)
    except ValueError as e:
        raise RequestError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent()
    args = build_parser().parse_args(argv)
    if os.environ.get("ELASTICKIT_DEBUG"):
        import logging

        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format=f"%(asctime)s node{os.environ.get('ELASTICKIT_NODE', '?')}.{os.environ.get('LOCAL_RANK', '0')} %(message)s",
        )
    from elastickit.checkpoint.errors import ElastickitError

    from .config import WorkerEnv
    from .runtime import ElasticWorker

    try:
        worker = ElasticWorker(config_from(args), WorkerEnv.from_environ())
        code = worker.run()
    except ElastickitError as e:
        print(f"error (worker pid {os.getpid()}): {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except ValueError as e:
        print(f"error (worker pid {os.getpid()}): {e}", file=sys.stderr, flush=True)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo sometimes aborts in its destructors after everything
    # succeeded (ANCHORS.md); the checkpoints were closed and the store told already.
    os._exit(code)


if __name__ == "__main__":
    main()
