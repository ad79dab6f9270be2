"""The reference hybrid-parallel trainer: a small GPT decoder on a (pp, dp, tp) DeviceMesh.

    from elastickit.trainer import TrainConfig, run_training
    result = run_training(TrainConfig(model="tiny", layout="pp=2,tp=2", steps=20))

    job = build_job(cfg)            # or drive the steps yourself (benchmarks)
    loss = job.train_step(0); state = job.state(); ck = job.checkpointer()

Modules: `model` (the decoder and how each parameter is sharded), `parallel` (layouts, TP,
FSDP2/replicate, pipelining, gradient clipping), `data` (resumable token stream), `loop`
(run_training), `hooks` (StepHook), `callbacks` (checkpointing for callback-style loops),
`worker` (the torchrun entry point behind `elastickit train`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import TrainConfig, TrainingJob, TrainResult, build_job, run_training
    from .parallel import TrainLayout

_LAZY = {
    "TrainConfig": "loop",
    "TrainResult": "loop",
    "run_training": "loop",
    "TrainingJob": "loop",
    "build_job": "loop",
    "TrainLayout": "parallel",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'elastickit.trainer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["TrainConfig", "TrainLayout", "TrainResult", "TrainingJob", "build_job", "run_training"]
