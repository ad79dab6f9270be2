"""Checks `elastickit train` makes before it starts a single process.

Everything a worker would find wrong after launch is found here instead, with one sentence
naming the flag and the fix: a layout the model cannot be split over, a fault that names a rank
outside the world or a step the run never reaches, a checkpoint root that cannot be written, and
a checkpoint that holds another model (read from its manifest; no tensor data is read).
The checks are functions of the request's values so the launcher and its tests share them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from elastickit.checkpoint.errors import DataError, RequestError

from .model import ModelConfig
from .parallel import TrainLayout

__all__ = [
    "check_checkpoint_model",
    "check_faults",
    "check_layout",
    "model_tensors",
    "plural",
]


def plural(n: int, noun: str) -> str:
    """`1 rank`, `2 ranks`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _either(items: Sequence[object], word: str = "or") -> str:
    """`1`, `1 or 2`, `1, 2 or 4`."""
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {word} {words[-1]}"


def check_layout(
    model: str,
    cfg: ModelConfig,
    layout: TrainLayout,
    *,
    global_batch: int,
    grad_accum: int,
    dp_mode: str,
) -> None:
    """Raise RequestError if `model` cannot be trained at `layout` (tp, pp, dp, dp_mode)."""
    tp = layout.tp
    if tp > 1:
        sizes = {"attention heads": cfg.n_heads, "kv heads": cfg.n_kv_heads}
        sizes["ffn units"] = cfg.ffn_hidden
        bad = [f"{n} {what}" for what, n in sizes.items() if n % tp]
        if bad:
            ok = _divisors(math.gcd(cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden))
            raise RequestError(
                f"--layout {layout}: model {model} has {_either(bad, 'and')}, "
                f"which do not split over tp={tp}; use tp={_either(ok)}"
            )
    if layout.pp > cfg.n_layers:
        raise RequestError(
            f"--layout {layout}: model {model} has {plural(cfg.n_layers, 'layer')}, too few for "
            f"pp={layout.pp} stages; use pp <= {cfg.n_layers}"
        )
    if global_batch % (layout.dp * grad_accum):
        ok = _divisors(global_batch // math.gcd(global_batch, grad_accum))
        ok = [d for d in ok if global_batch % (d * grad_accum) == 0]
        raise RequestError(
            f"--layout {layout}: the global batch of {global_batch} samples in {grad_accum} "
            f"microbatches does not split over dp={layout.dp}; use dp={_either(ok)}"
        )
    if dp_mode == "replicate" and tp > 1:
        raise RequestError(
            f"--dp-mode replicate works without tp only, and --layout {layout} has tp={tp}; "
            "use --dp-mode fsdp"
        )


def check_faults(
    specs: Sequence[str], *, world_size: int, steps: int, first_step: int, monitor: bool
) -> None:
    """Raise RequestError for an `--inject` value that is malformed, names a rank outside the
    world, or fires at a step this run never runs (steps first_step+1 .. steps)."""
    if not specs:
        return
    from elastickit.faults import parse_fault

    for text in specs:
        spec = parse_fault(text, world_size)
        at_step = spec.kind in ("crash", "hang")
        if at_step and spec.step < 1:
            raise RequestError(
                f"--inject {text!r}: steps are numbered from 1 (the first step is step 1); "
                f"use step=1..{steps}"
            )
        if spec.step > steps:
            raise RequestError(
                f"--inject {text!r}: step {spec.step} is past --steps {steps}, so the fault "
                f"would never fire; use a step from {first_step + 1} to {steps}"
            )
        if at_step and spec.step <= first_step:
            raise RequestError(
                f"--inject {text!r}: the run resumes after step {first_step} from its checkpoint, "
                f"so step {spec.step} never runs; use a step from {first_step + 1} to {steps}"
            )
        if not monitor and spec.kind in ("hang", "slowlink"):
            raise RequestError(
                f"--inject {text!r} needs the collective monitor "
                f"({'it aborts the hung job' if spec.kind == 'hang' else 'it delays the link'}); "
                "drop --no-monitor"
            )


def model_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Logical name -> shape of the model's entries in a checkpoint of the reference trainer
    (the same at every layout: the rules store unfused, unpadded tensors)."""
    import torch

    from elastickit.reshard.layout import axis_coords, axis_sizes

    from .model import Transformer
    from .rules import model_rules, parallel_layout

    with torch.device("meta"):  # shapes only: no memory, no init
        model = Transformer(cfg, tp=1)
    rules = model_rules(cfg)
    record = parallel_layout(TrainLayout()).to_record()
    sizes, coords = axis_sizes(record), axis_coords(record, 0)
    out: dict[str, tuple[int, ...]] = {}
    for fqn, t in model.state_dict().items():
        name = f"model/{fqn}"
        rule = rules.match(name)
        if rule is None:
            out[name] = tuple(t.shape)
            continue
        _, specs = rule.pieces(name, t, sizes, coords)
        out.update((s.name, tuple(s.shape)) for s in specs)
    return out


def newest_step(root: str) -> tuple[int, dict[str, tuple[int, ...]], str | None] | None:
    """(step, model entries, model name it was saved with) of the checkpoint a restore from
    `root` takes: the newest committed one whose manifest reads (restore falls back past a
    corrupt manifest the same way); None when there is none."""
    from elastickit.checkpoint.format.directory import list_checkpoints, load_manifest

    for info in reversed(list_checkpoints(root)):
        if not info.complete:
            continue
        try:
            manifest = load_manifest(info.path)
        except DataError:
            continue
        entries = {
            name: tuple(t.shape)
            for name, t in manifest.tensors.items()
            if name.startswith("model/")
        }
        extra = manifest.objects.get("extra")
        saved = extra.get("model") if isinstance(extra, dict) else None
        return manifest.step, entries, saved if isinstance(saved, str) else None
    return None


def check_checkpoint_model(root: str, model: str, expected: dict[str, tuple[int, ...]]) -> int:
    """The step a restore from `root` resumes after (0: none); RequestError if that checkpoint
    holds another model than `expected` (names and shapes of its `model/` tensors)."""
    newest = newest_step(root)
    if newest is None:
        return 0
    step, found, saved = newest
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(n for n in set(found) & set(expected) if found[n] != expected[n])
    if not (missing or unexpected or reshaped):
        return step
    if reshaped:
        n = reshaped[0]
        first = f"{n} is {list(found[n])} there but {list(expected[n])} in model {model}"
    elif missing:
        first = f"it lacks {missing[0]}, which model {model} has"
    else:
        first = f"it has {unexpected[0]}, which model {model} lacks"
    more = len(missing) + len(unexpected) + len(reshaped) - 1
    tail = f" ({plural(more, 'more difference')})" if more else ""
    hint = (
        f"pass --model {saved}"
        if saved and saved != model
        else "pass the --model it was saved with"
    )
    raise RequestError(
        f"--ckpt {root}: its checkpoint of step {step} holds another model: {first}{tail}; "
        f"{hint}, or another --ckpt",
        path=root,
    )
