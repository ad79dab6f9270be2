"""Accelerate's `save_state` / `load_state` through elastickit: one line after `prepare()`.

    accelerator = Accelerator()
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.register_for_checkpointing(progress)      # your own state, as usual
    from elastickit.integrations.accelerate import install
    install(accelerator, "runs/exp1/ckpt", every=50)        # the one line to add
    accelerator.load_state()       # newest checkpoint (returns quietly when there is none)
    ...
    accelerator.save_state()       # lazy: returns at once; the copy overlaps the next step

What a checkpoint holds: what `save_state` writes (every prepared model, optimizer and scheduler,
the gradient scaler, each rank's RNG states, every object registered with
`register_for_checkpointing`, the state of stateful dataloaders) plus each prepared dataloader's
epoch counter (which seeds its sampler). The step of a checkpoint is the number of optimizer
steps taken (counted from the optimizers), or `step=` when you pass it.

`save_state(output_dir)` also writes a small JSON marker into `output_dir` naming the elastickit
step, so that `load_state(output_dir)` loads exactly that checkpoint (or says, in one sentence,
that it was never committed); `load_state()` with no folder loads the newest checkpoint on any
tier. A load at another world size reshards the model and optimizer states; RNG states are
restored only at the same world size.
"""

from __future__ import annotations

import json
import os
from typing import Any

from elastickit.checkpoint.errors import DataError, RequestError
from elastickit.integrations._common import base_optimizer, load_optimizer_holder

__all__ = ["ElastickitAccelerateState", "install"]

MARKER = "elastickit-state.json"
MARKER_FORMAT = "elastickit-accelerate-marker"


class _LoaderEntry:
    """The prepared dataloaders' epoch counters and, for stateful ones, their own state."""

    def __init__(self, loaders: list[Any]) -> None:
        self.loaders = loaders

    def state_dict(self) -> dict[str, Any]:
        out = []
        for dl in self.loaders:
            d: dict[str, Any] = {"iteration": int(getattr(dl, "iteration", 0))}
            if getattr(dl, "use_stateful_dataloader", False):
                d["state"] = dl.state_dict()
            out.append(d)
        return {"loaders": out}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        saved = d.get("loaders", [])
        if len(saved) != len(self.loaders):
            raise RequestError(
                f"the checkpoint holds {len(saved)} prepared dataloaders, this run prepared {len(self.loaders)}; "
                "prepare the same dataloaders as the run that saved"
            )
        for dl, s in zip(self.loaders, saved, strict=True):
            if hasattr(dl, "iteration"):
                dl.iteration = int(s["iteration"])
            if "state" in s:
                dl.load_state_dict(s["state"])


class ElastickitAccelerateState:
    """What `install` puts behind `accelerator.save_state` / `load_state`.

    Args:
        accelerator: the `accelerate.Accelerator`, after `prepare()`.
        root: the checkpoint root.
        every: with `save_state()` called every step, checkpoint every N optimizer steps
            (`save_state` is cheap when not due); default: every call.
        tiers, checkpointer_kwargs: passed on to `elastickit.Checkpointer`.
    """

    def __init__(self, accelerator: Any, root: str | os.PathLike[str], *, every: int | None = None,
                 tiers: Any = None, **checkpointer_kwargs: Any) -> None:
        from elastickit.api import Checkpointer

        self.accelerator = accelerator
        self.root = os.path.abspath(os.fspath(root))
        self.checkpointer = Checkpointer(self.root, every=every, tiers=tiers, **checkpointer_kwargs)
        self.steps = 0  # optimizer steps taken (the checkpoint step)
        self._counted: set[int] = set()
        self._unwrapped: dict[int, tuple[Any, Any]] = {}  # id(prepared model) -> (it, unwrapped)
        self._count_steps()
        for m in accelerator._models:
            self._unwrap(m)

    # -- what accelerate has prepared -----------------------------------------------------
    # accelerate keeps the prepared objects in these lists and its own save_state walks them.

    def _parts(self) -> dict[str, list[Any]]:
        acc = self.accelerator
        return {
            "model": list(acc._models),
            "optim": [base_optimizer(o) for o in acc._optimizers],
            "sched": [getattr(s, "scheduler", s) for s in acc._schedulers],
            "custom": list(acc._custom_objects),
            "loaders": list(acc._dataloaders),
        }

    def _count_steps(self) -> None:
        opts = self._parts()["optim"]
        if opts and id(opts[0]) not in self._counted:
            self._counted.add(id(opts[0]))
            opts[0].register_step_post_hook(lambda *_a, **_k: self._step())

    def _step(self) -> None:
        self.steps += 1

    def _unwrap(self, model: Any) -> Any:
        # Once per prepared model, never on the training thread's save path: accelerate's
        # unwrap_model imports DeepSpeed when it is installed (seconds, the first time).
        hit = self._unwrapped.get(id(model))
        if hit is None or hit[0] is not model:
            hit = (model, self.accelerator.unwrap_model(model))
            self._unwrapped[id(model)] = hit
        return hit[1]

    def _owner(self, optim: Any, models: list[Any]) -> Any:
        params = {id(p) for g in optim.param_groups for p in g["params"]}
        for m in models:
            if params <= {id(p) for p in m.parameters()}:
                return m
        raise RequestError("cannot tell which prepared model an optimizer belongs to; prepare the model with it")

    def _state(self, parts: dict[str, list[Any]]) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for i, m in enumerate(parts["model"]):
            state[f"model{i}"] = self._unwrap(m)  # names without DDP's "module."
        for i, o in enumerate(parts["optim"]):
            state[f"optim{i}"] = o
        for i, s in enumerate(parts["sched"]):
            state[f"sched{i}"] = s
        for i, c in enumerate(parts["custom"]):
            state[f"custom{i}"] = c
        state["loaders"] = _LoaderEntry(parts["loaders"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            state["scaler"] = scaler
        state["progress"] = _Progress(self)
        return state

    # -- accelerate's two methods -----------------------------------------------------------

    def save_state(self, output_dir: str | None = None, *, step: int | None = None, **_ignored: Any) -> str:
        """Take a checkpoint (lazy); return the root it goes to."""
        self._count_steps()
        step = self.steps if step is None else int(step)
        parts = self._parts()
        # Each checkpoint has its own step: several save_state calls between two optimizer
        # steps keep the first.
        handle = self.checkpointer.save(step, self._state(parts))
        if output_dir is not None and handle.scheduled and self.accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, MARKER), "w") as f:
                json.dump({"format": MARKER_FORMAT, "root": self.root, "step": step}, f)
        return self.root

    def load_state(self, input_dir: str | None = None, **_ignored: Any) -> int:
        """Restore the newest checkpoint (or the one `input_dir` names); return its step, 0 if none."""
        self._count_steps()
        want = None
        if input_dir is not None:
            want = self._marker_step(input_dir)
        parts = self._parts()
        state = self._state(parts)
        holders = {name: {} for name in state if name.startswith("optim")}
        restore_state = {k: v for k, v in state.items() if not k.startswith("optim")}
        step = self.checkpointer.restore({**restore_state, **holders}, step=want)
        if step == 0:
            return 0
        models = [state[k] for k in state if k.startswith("model")]
        steps = self.steps
        for name, holder in holders.items():
            optim = state[name]
            load_optimizer_holder(self._owner(optim, models), optim, holder)
        # Loading may run a step with zero gradients to create the optimizer state (torch's
        # set_optimizer_state_dict does): that is no training step.
        self.steps = steps
        return step

    def _marker_step(self, input_dir: str) -> int:
        path = os.path.join(input_dir, MARKER)
        try:
            with open(path) as f:
                marker = json.load(f)
        except FileNotFoundError:
            raise RequestError(
                f"{input_dir} holds no {MARKER}: it was not saved through elastickit (call load_state() "
                "without a folder for the newest elastickit checkpoint)", path=input_dir) from None
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e})", path=path) from e
        if marker.get("format") != MARKER_FORMAT or os.path.abspath(marker.get("root", "")) != self.root:
            raise RequestError(
                f"{path} points to checkpoints under {marker.get('root')!r}, not this run's {self.root!r}", path=path)
        return int(marker["step"])

    def wait(self) -> None:
        """Block until every checkpoint taken so far is durable."""
        self.checkpointer.wait()

    def close(self) -> None:
        """Wait until every checkpoint is durable and stop the background writers."""
        self.checkpointer.close()


class _Progress:
    """The optimizer-step counter, so that a resumed run goes on counting from the checkpoint."""

    def __init__(self, owner: ElastickitAccelerateState) -> None:
        self.owner = owner

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.owner.steps}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.owner.steps = int(d["steps"])


def install(accelerator: Any, root: str | os.PathLike[str], **kwargs: Any) -> ElastickitAccelerateState:
    """Route `accelerator.save_state` / `load_state` through elastickit (call after `prepare()`).

    Returns the object behind them (its `wait()` / `close()`: every checkpoint durable).
    """
    state = ElastickitAccelerateState(accelerator, root, **kwargs)
    accelerator.save_state = state.save_state
    accelerator.load_state = state.load_state
    return state
