"""Lightning on elastickit: one callback, lazy multi-tier saves, automatic resume.

    from elastickit.integrations.lightning import ElastickitCallback
    trainer = L.Trainer(max_steps=1000, strategy="ddp",
                        callbacks=[ElastickitCallback("runs/exp1/ckpt", every=50)])
    trainer.fit(model, datamodule)    # re-run the same script after a failure: it resumes by itself

What a checkpoint holds: what Lightning's own `.ckpt` holds (the LightningModule's weights, every
optimizer and learning-rate scheduler, the loops' progress with the state of resumable
dataloaders, every callback's state, the precision plugin's and the datamodule's state, the
`on_save_checkpoint` extras) plus each rank's RNG states, which Lightning's checkpoint leaves out.

How a save works: after an optimizer step (`on_train_batch_end`), `Checkpointer.save` records
references and returns; the copy runs while the next batches train and only the next optimizer
step waits for it (a fence), then the checkpoint flows down the tiers.

How a resume works: in `on_fit_start` (after the strategy has set up the model and the
optimizers, before Lightning restores anything), if `fit()` was given no `ckpt_path`, the
newest elastickit checkpoint is loaded into the live objects (resharded when the world size
changed) and Lightning's loop, callback, precision and datamodule states are handed back through
their own `load_state_dict` methods, so Lightning continues exactly as after its own
`fit(ckpt_path=...)`. As with Lightning's own checkpoints, a resume in the middle of an epoch
is exact only for a dataloader that has `state_dict()`/`load_state_dict()` (Lightning warns
otherwise); at an epoch boundary any dataloader is.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl

from elastickit.checkpoint.errors import RequestError
from elastickit.integrations._common import base_optimizer, load_optimizer_holder

__all__ = ["ElastickitCallback"]


class _LightningEntry:
    """The `lightning` entry of a checkpoint: what Lightning's own checkpoint holds besides the
    weights, the optimizers and the schedulers, gathered through public hooks."""

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer, self.pl_module = trainer, pl_module

    def state_dict(self) -> dict[str, Any]:
        t, m = self.trainer, self.pl_module
        ck: dict[str, Any] = {
            "epoch": t.current_epoch,
            "global_step": t.global_step,
            "pytorch-lightning_version": pl.__version__,
            "loops": {"fit_loop": t.fit_loop.state_dict()},
            "callbacks": {},
            "world_size": t.world_size,
        }
        for cb in t.callbacks:
            if isinstance(cb, ElastickitCallback):
                continue
            state = cb.state_dict()
            if state:
                ck["callbacks"][cb.state_key] = state
        prec = t.precision_plugin.state_dict()
        if prec:
            ck["precision"] = {"name": type(t.precision_plugin).__qualname__, "state": prec}
        dm = t.datamodule
        if dm is not None:
            dm_state = dm.state_dict()
            if dm_state:
                ck["datamodule"] = dm_state
        for cb in t.callbacks:
            if not isinstance(cb, ElastickitCallback):
                cb.on_save_checkpoint(t, m, ck)
        m.on_save_checkpoint(ck)
        return ck

    def load_state_dict(self, d: dict[str, Any]) -> None:  # restores go through a plain dict
        raise NotImplementedError


class ElastickitCallback(pl.Callback):
    """Saves a Lightning run's whole state with elastickit and resumes from it automatically.

    Args:
        root: the checkpoint root (the persistent tier unless `tiers` says otherwise).
        every: checkpoint every N optimizer steps (default 1). The last step is always saved.
        tiers: elastickit tiers (`elastickit.checkpoint.tiers.Tiers`).
        resume: restore from elastickit's newest checkpoint when `fit()` is given no `ckpt_path`.
        checkpointer_kwargs: passed on to `elastickit.Checkpointer`.
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
        self._state: dict[str, Any] | None = None
        self._last_saved = -1

    def _objects(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        state: dict[str, Any] = {"model": pl_module}
        for i, opt in enumerate(trainer.optimizers):
            state[f"optim{i}"] = base_optimizer(opt)
        for i, config in enumerate(trainer.lr_scheduler_configs):
            state[f"sched{i}"] = config.scheduler
        return state

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from elastickit.api import Checkpointer

        if self.checkpointer is None:
            self.checkpointer = Checkpointer(self.root, **self._kwargs)
        objects = self._objects(trainer, pl_module)
        self._last_saved = -1
        self.restored_step = 0
        if self.resume and trainer.ckpt_path is None:
            self._restore(trainer, pl_module, objects)
        self._state = {**objects, "lightning": _LightningEntry(trainer, pl_module)}

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, objects: dict[str, Any]) -> None:
        # Optimizers and schedulers are restored into plain dicts first and then handed to the
        # live objects: the same path whether or not the world size changed.
        holders: dict[str, Any] = {name: {} for name in objects if name != "model"}
        holders["lightning"] = {}
        step = self.checkpointer.restore({"model": pl_module, **holders})
        if step == 0:
            return
        self.restored_step = step
        for name, obj in objects.items():
            if name.startswith("optim"):
                load_optimizer_holder(pl_module, obj, holders[name])
            elif name.startswith("sched"):
                obj.load_state_dict(dict(holders[name]))
        ck = holders["lightning"]
        # What Lightning's own restore does with a loaded checkpoint, through the same hooks.
        pl_module.on_load_checkpoint(ck)
        for cb in trainer.callbacks:
            if not isinstance(cb, ElastickitCallback):
                cb.on_load_checkpoint(trainer, pl_module, ck)
                state = ck.get("callbacks", {}).get(cb.state_key)
                if state:
                    cb.load_state_dict(state)
        if "precision" in ck:
            if ck["precision"]["name"] != type(trainer.precision_plugin).__qualname__:
                raise RequestError(
                    f"the checkpoint under {self.root} was saved with precision plugin {ck['precision']['name']}, "
                    f"this run uses {type(trainer.precision_plugin).__qualname__}"
                )
            trainer.precision_plugin.load_state_dict(ck["precision"]["state"])
        if "datamodule" in ck and trainer.datamodule is not None:
            trainer.datamodule.load_state_dict(ck["datamodule"])
        trainer.fit_loop.load_state_dict(ck["loops"]["fit_loop"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = int(trainer.global_step)
        if step == self._last_saved or step == self.restored_step and self._last_saved < 0:
            return  # no optimizer step since the last save (gradient accumulation)
        if self.checkpointer.due(step):
            self._save(step)

    def _save(self, step: int) -> None:
        self.checkpointer.save(step, self._state, force=True)
        self._last_saved = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        if step > max(self._last_saved, self.restored_step):
            self._save(step)
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        """Wait until every checkpoint is durable and stop the background writers."""
        ck, self.checkpointer = self.checkpointer, None
        if ck is not None:
            ck.close()
