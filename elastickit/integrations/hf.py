"""The Hugging Face Trainer on elastickit: one callback, lazy multi-tier saves, automatic resume.

    from elastickit.integrations.hf import ElastickitCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[ElastickitCallback("runs/exp1/ckpt", every=50)])
    trainer.train()            # re-run the same script after a failure: it resumes by itself

What a checkpoint holds: everything the Trainer's own `checkpoint-N/` holds (model, optimizer,
learning-rate scheduler, each rank's RNG states, the `TrainerState` with its log history and
its stateful callbacks); the data position is the Trainer's global step, from which the Trainer
fast-forwards its dataloader exactly as it does for its own checkpoints.

How a save works: after an optimizer step, once the step's logging and evaluation are done (the
point where the Trainer itself would save, so that the RNG states and the log history match),
`Checkpointer.save` records references and returns; the tensors are copied in the background
while the next forward and backward run (the only wait is a fence before the next optimizer
step), then flow down the tiers.

How a resume works: `trainer.train()` is wrapped when the Trainer is built. If elastickit holds
a checkpoint and the call names no checkpoint of its own, the model, optimizer and scheduler
states are restored from elastickit (resharded when the world size changed) and the Trainer is
pointed at a small temporary folder holding only `trainer_state.json` and this rank's RNG file:
the Trainer's own resume logic then skips the trained epochs and batches and reloads the RNG
states at the same instant as for its own checkpoints, so a resumed run is bit-exact with an
uninterrupted one (same world size; at another world size the Trainer's data split changes).
An explicit `trainer.train(resume_from_checkpoint="out/checkpoint-500")` is left to the Trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from elastickit.checkpoint.errors import RequestError
from elastickit.integrations._common import (
    base_optimizer,
    find_caller,
    load_optimizer_holder,
    rng_states,
)

__all__ = ["ElastickitCallback"]

_TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME


class _TrainerStateEntry:
    """The `trainer` entry of a checkpoint: the TrainerState as the Trainer writes it to
    `trainer_state.json` (stateful callbacks brought up to date), plus the world size."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        d = dataclasses.asdict(t.state)
        callbacks = dict(d.get("stateful_callbacks") or {})
        # What `Trainer._save_checkpoint` does before writing trainer_state.json.
        from transformers.trainer_callback import ExportableState

        for cb in [*t.callback_handler.callbacks, t.control]:
            if isinstance(cb, ExportableState):
                name = type(cb).__name__
                if isinstance(callbacks.get(name), list):
                    callbacks[name] = [*callbacks[name], cb.state()]
                else:
                    callbacks[name] = cb.state()
        d["stateful_callbacks"] = callbacks
        return {"state": json.loads(json.dumps(d)), "world_size": int(t.args.world_size)}

    def load_state_dict(self, d: dict[str, Any]) -> None:  # restores go through a plain dict
        raise NotImplementedError


class ElastickitCallback(TrainerCallback):
    """Saves the Trainer's whole state with elastickit and resumes from it automatically.

    Args:
        root: the checkpoint root (the persistent tier unless `tiers` says otherwise).
        every: checkpoint every N optimizer steps (default 1). The last step is always saved.
        tiers: elastickit tiers (`elastickit.checkpoint.tiers.Tiers`): memory, local, peer,
            persistent.
        resume: restore from elastickit's newest checkpoint when `train()` names none.
        checkpointer_kwargs: passed on to `elastickit.Checkpointer` (keep_last, every_seconds,
            auto, fsync, ...).

    Add it to `Trainer(callbacks=[...])`; nothing else changes. Under torchrun every rank
    builds it with the same arguments, as it builds the Trainer.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        every: int | None = None,
        tiers: Any = None,
        resume: bool = True,
        **checkpointer_kwargs: Any,
    ) -> None:
        self.root = os.fspath(root)
        self.resume = resume
        self._kwargs = {"every": every, "tiers": tiers, **checkpointer_kwargs}
        self.checkpointer: Any = None
        self.restored_step = 0
        self._trainer: Trainer | None = None
        self._holders: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None
        self._pending: int | None = None

    # -- wiring -----------------------------------------------------------------------------

    def attach(self, trainer: Trainer) -> None:
        """Bind to `trainer` (done by itself when the Trainer is built; call it yourself only if
        you add the callback some other way)."""
        if self._trainer is trainer:
            return
        if getattr(trainer, "is_deepspeed_enabled", False):
            raise RequestError(
                "ElastickitCallback does not drive DeepSpeed's engine; use "
                "elastickit.integrations.deepspeed_engine.install(engine) for DeepSpeed runs"
            )
        self._trainer = trainer
        original = trainer.train

        @functools.wraps(original)
        def train(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
            return self._train(original, resume_from_checkpoint, *args, **kwargs)

        trainer.train = train  # type: ignore[method-assign]

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = find_caller(
            lambda o: isinstance(o, Trainer) and any(cb is self for cb in o.callback_handler.callbacks)
        )
        if trainer is None:
            raise RequestError(
                "ElastickitCallback could not find its Trainer; call callback.attach(trainer) after "
                "building the Trainer"
            )
        self.attach(trainer)

    def _open(self) -> Any:
        from elastickit.api import Checkpointer

        if self.checkpointer is None:
            self.checkpointer = Checkpointer(self.root, **self._kwargs)
        return self.checkpointer

    def _train(self, original: Any, resume_from_checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
        trainer = self._trainer
        assert trainer is not None
        self._holders, self._state, self._pending, self.restored_step = None, None, None, 0
        ck = self._open()
        explicit = isinstance(resume_from_checkpoint, str | os.PathLike)
        if not self.resume or explicit:
            return original(resume_from_checkpoint, *args, **kwargs)
        if trainer.model_init is not None:
            raise RequestError(
                "ElastickitCallback cannot resume a Trainer built with model_init (it re-creates the "
                "model inside train()); pass model= instead"
            )
        holders: dict[str, Any] = {"optim": {}, "sched": {}, "trainer": {}}
        step = ck.restore({"model": trainer.model, **holders})
        if step == 0:
            return original(None if resume_from_checkpoint is True else resume_from_checkpoint, *args, **kwargs)
        self.restored_step = step
        self._holders = holders
        tmp = tempfile.mkdtemp(prefix="elastickit-hf-resume-")
        try:
            folder = os.path.join(tmp, f"checkpoint-{step}")
            os.makedirs(folder)
            with open(os.path.join(folder, _TRAINER_STATE), "w") as f:
                json.dump(holders["trainer"]["state"], f)
            # The Checkpointer restored this rank's RNG states when the world size is the same;
            # the Trainer sets them again at the exact point of its loop where it does for its
            # own checkpoints (after fast-forwarding the dataloader).
            if int(holders["trainer"].get("world_size", -1)) == int(trainer.args.world_size):
                rng = rng_states()
                torch.save(rng, os.path.join(folder, "rng_state.pth"))
                torch.save(rng, os.path.join(folder, f"rng_state_{trainer.args.process_index}.pth"))
            # The weights are already in place; the Trainer must not look for its own files.
            trainer._load_from_checkpoint = lambda *a, **k: None  # type: ignore[method-assign]
            try:
                return original(folder, *args, **kwargs)
            finally:
                del trainer._load_from_checkpoint
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- the Trainer's events ---------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer
        if trainer is None:
            raise RequestError("ElastickitCallback is not attached to a Trainer; call callback.attach(trainer)")
        self._open()
        model = kwargs.get("model") or trainer.model
        optimizer = base_optimizer(kwargs.get("optimizer") or trainer.optimizer)
        scheduler = kwargs.get("lr_scheduler") or trainer.lr_scheduler
        if self._holders is not None:
            load_optimizer_holder(model, optimizer, self._holders["optim"])
            scheduler.load_state_dict(dict(self._holders["sched"]))
            self._holders = None
        self._state = {"model": model, "optim": optimizer, "sched": scheduler, "trainer": _TrainerStateEntry(trainer)}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        if self.checkpointer.due(step) or step >= state.max_steps:
            self._pending = step
        self._flush(control)

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush(control)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush(control)

    def _flush(self, control: Any) -> None:
        # Save where the Trainer would: after this step's logging and evaluation (evaluation
        # draws from the RNG, logging appends to the log history).
        if self._pending is None or control.should_log or control.should_evaluate:
            return
        step, self._pending = self._pending, None
        self.checkpointer.save(step, self._state, force=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pending is not None:
            step, self._pending = self._pending, None
            self.checkpointer.save(step, self._state, force=True)
        self.close()

    def close(self) -> None:
        """Wait until every checkpoint is durable and stop the background writers."""
        ck, self.checkpointer = self.checkpointer, None
        if ck is not None:
            ck.close()
