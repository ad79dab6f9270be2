"""Damaged foreign checkpoints through `elastickit convert`: one sentence, never a traceback,
never a wrong tensor loaded silently where the format has a checksum to tell.

Pristine sources, made here without the frameworks' training loops:
- DeepSpeed ZeRO-2 (2 ranks): `mp_rank_00_model_states.pt`, `zero_pp_rank_<r>_mp_rank_00_optim_states.pt`
  written by `torch.save` (with its per-record CRC32, as DeepSpeed writes them), DeepSpeed's own
  classes pickled under their real names, and the `latest` file;
- PyTorch DCP (`torch.distributed.checkpoint.save`): `.metadata` and `__0_0.distcp`;
- a Hugging Face model in two safetensors shards and `model.safetensors.index.json`.

Each trial damages one file (bits, truncation, deletion, zeroed bytes), runs `elastickit convert
SRC DST` in this process, and sorts the result: detected (exit 1 or 2, one line `error: ...`),
harmless (exit 0, every tensor equal to the pristine conversion), silent (exit 0, some tensor
differs), or broken (a traceback, an internal error, another exit code: always a failure).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any

from tests.torture.corruption import Mutation, Restorer, random_mutation

FORMATS = ("deepspeed", "dcp", "safetensors")


def _tensors() -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(3)
    return {
        "embed.weight": torch.randn(11, 6, generator=g),
        "fc.weight": torch.randn(5, 6, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "norm.weight": torch.randn(5, generator=g),
    }


def _fake_deepspeed() -> dict[str, Any]:
    """DeepSpeed's classes that its checkpoints pickle, under their real module names, without
    DeepSpeed: pickled by `torch.save`, they give the bytes DeepSpeed writes. Only ever installed
    in a child process (they would shadow a real DeepSpeed)."""
    import enum
    import sys
    import types
    from dataclasses import dataclass as dc

    classes: dict[str, Any] = {}

    class LossScaler:
        pass

    class ZeroStageEnum(int, enum.Enum):
        disabled = 0
        optimizer_states = 1
        gradients = 2
        weights = 3

    @dc
    class fragment_address:
        numel: int
        start: int

    for mod, cls in (
        ("deepspeed.runtime.fp16.loss_scaler", LossScaler),
        ("deepspeed.runtime.zero.config", ZeroStageEnum),
        ("deepspeed.utils.tensor_fragment", fragment_address),
    ):
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            sys.modules.setdefault(name, types.ModuleType(name))
        cls.__module__ = mod
        cls.__qualname__ = cls.__name__
        setattr(sys.modules[mod], cls.__name__, cls)
        classes[cls.__name__] = cls
    return classes


def make_deepspeed(path: str) -> None:
    """A ZeRO-2 checkpoint of 2 ranks (tag global_step7), written by torch.save in a child
    process with DeepSpeed's class names (see `_fake_deepspeed`)."""
    from tests.torture.procs import run_in_child

    run_in_child(_write_deepspeed, path)


def _write_deepspeed(path: str) -> None:
    from collections import OrderedDict

    import torch

    ds = _fake_deepspeed()
    truth = _tensors()
    tag = os.path.join(path, "global_step7")
    os.makedirs(tag)
    world = 2
    flat = torch.cat([t.reshape(-1) for t in truth.values()])
    total = flat.numel()
    part = -(-total // world)
    padded = torch.cat([flat, torch.zeros(part * world - total)])
    shapes = OrderedDict((n, torch.Size(t.shape)) for n, t in truth.items())
    module = {n: t.clone() for n, t in truth.items()}
    torch.save(
        {
            "module": module,
            "buffer_names": [],
            "optimizer": None,
            "param_shapes": [shapes],
            "shared_params": {},
            "lr_scheduler": {"last_batch_iteration": 6},
            "global_steps": 7,
            "dp_world_size": world,
            "mp_world_size": 1,
            "ds_version": "0.19.8",
        },
        os.path.join(tag, "mp_rank_00_model_states.pt"),
    )
    offsets, off = {}, 0
    for n, t in truth.items():
        offsets[n] = off
        off += t.numel()
    for r in range(world):
        mapping = OrderedDict()
        for n, t in truth.items():
            lo, hi = max(offsets[n], r * part), min(offsets[n] + t.numel(), (r + 1) * part)
            if lo < hi:
                mapping[n] = ds["fragment_address"](numel=hi - lo, start=lo - r * part)
        pad = part * world - total if r == world - 1 else 0
        chunk = padded[r * part : (r + 1) * part]
        scaler = ds["LossScaler"]()
        scaler.__dict__.update(cur_scale=1.0, dynamic=False)
        osd = {
            "loss_scaler": scaler,
            "zero_stage": ds["ZeroStageEnum"](2),
            "base_optimizer_state": {
                "state": {
                    0: {
                        "step": torch.tensor(7.0),
                        "exp_avg": chunk * 0.1,
                        "exp_avg_sq": chunk * chunk,
                    }
                },
                "param_groups": [{"lr": 0.1, "params": [0]}],
            },
            "single_partition_of_fp32_groups": [chunk[: part - pad].clone()],
            "group_paddings": [pad],
            "param_alignment_paddings": [[0] * len(truth)],
            "partition_count": [world],
            "param_slice_mappings": [mapping],
        }
        torch.save(
            {"optimizer_state_dict": osd},
            os.path.join(tag, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
        )
    with open(os.path.join(path, "latest"), "w") as f:
        f.write("global_step7")


def make_dcp(path: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    truth = _tensors()
    state = {
        "model": truth,
        "optim": {
            "state": {k: {"exp_avg": v * 0.5, "step": torch.tensor(3.0)} for k, v in truth.items()}
        },
    }
    dcp.save(state, checkpoint_id=path)


def make_safetensors(path: str) -> None:
    import json

    from safetensors.torch import save_file

    truth = _tensors()
    os.makedirs(path)
    names = sorted(truth)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for fname, keys in shards.items():
        save_file(
            {k: truth[k].contiguous() for k in keys},
            os.path.join(path, fname),
            metadata={"format": "pt"},
        )
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(
            {
                "metadata": {"total_size": sum(t.numel() * 4 for t in truth.values())},
                "weight_map": weight_map,
            },
            f,
        )


MAKERS = {"deepspeed": make_deepspeed, "dcp": make_dcp, "safetensors": make_safetensors}

#: Where a format keeps no checksum over the bytes, so that a change which leaves the file
#: readable cannot be noticed: (format, file type) -> what is unprotected. Everything else a
#: foreign format holds is checked: DeepSpeed's .pt records and each item of a DCP .distcp file
#: carry the CRC32 torch.save stores, which elastickit verifies (torch.load does not).
UNPROTECTED: dict[tuple[str, str], str] = {
    ("safetensors", "*.safetensors (shard)"): "no checksum at all: a changed byte of tensor data "
    "(or a header change that stays consistent) loads as a wrong value",
    ("dcp", ".metadata"): "a pickle without a checksum: a change that keeps it readable can rename "
    "a tensor or move a chunk",
    ("deepspeed", "latest"): "a text file naming the tag: a change that names another existing tag "
    "loads that checkpoint",
}


def convert(src: str, dst: str) -> tuple[int, str]:
    """`elastickit convert SRC DST` in this process: (exit code, everything it printed)."""
    from typer.testing import CliRunner

    from elastickit.cli.main import app

    res = CliRunner().invoke(app, ["convert", src, dst])
    text = res.output or ""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        text += "".join(traceback.format_exception(res.exception))
    return res.exit_code, text


def read_back(dst: str) -> dict[str, bytes]:
    """Every tensor of a converted elastickit checkpoint, as bytes."""
    from elastickit.reshard.adapters.registry import open_source

    src = open_source(dst, "elastickit")
    try:
        return {
            n: src.read(n).contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
            for n in sorted(src.tensors())
        }
    finally:
        src.close()


@dataclass
class ForeignTrial:
    fmt: str
    file: str
    mutation: Mutation
    outcome: str = ""  # detected | harmless | silent | broken
    message: str = ""
    changed: list[str] = field(default_factory=list)  # tensors that differ (silent)


def classify(
    code: int, text: str, got: dict[str, bytes] | None, ref: dict[str, bytes]
) -> tuple[str, list[str]]:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    if "Traceback" in text or "internal error" in text:
        return "broken", []
    if code in (1, 2):
        errors = [x for x in lines if x.startswith("error:")]
        return ("detected", []) if len(errors) == 1 else ("broken", [])
    if code != 0 or got is None:
        return "broken", []
    changed = sorted(n for n in set(ref) | set(got) if ref.get(n) != got.get(n))
    return ("silent" if changed else "harmless"), changed


@dataclass
class ForeignReport:
    trials: list[ForeignTrial] = field(default_factory=list)

    def broken(self) -> list[str]:
        return [
            f"{t.fmt} {t.file} ({t.mutation.describe()}): {t.message[-1500:]}"
            for t in self.trials
            if t.outcome == "broken"
        ]

    def table(self) -> dict[tuple[str, str], dict[str, int]]:
        out: dict[tuple[str, str], dict[str, int]] = {}
        for t in self.trials:
            row = out.setdefault(
                (t.fmt, file_type(t.file)),
                {"trials": 0, "detected": 0, "harmless": 0, "silent": 0, "broken": 0},
            )
            row["trials"] += 1
            row[t.outcome] += 1
        return out


def file_type(name: str) -> str:
    base = os.path.basename(name)
    if base.endswith(".distcp"):
        return ".distcp"
    if base.endswith("optim_states.pt"):
        return "*_optim_states.pt"
    if base.endswith("model_states.pt"):
        return "*_model_states.pt"
    if base.endswith(".safetensors"):
        return "*.safetensors (shard)"
    return base


def campaign(
    work: str, *, trials: int, seed: int, formats: tuple[str, ...] = FORMATS
) -> ForeignReport:
    rng = random.Random(seed)
    report = ForeignReport()
    srcs, refs = {}, {}
    for fmt in formats:
        src = os.path.join(work, "src", fmt)
        os.makedirs(os.path.dirname(src), exist_ok=True)
        MAKERS[fmt](src)
        code, text = convert(src, os.path.join(work, "ref", fmt))
        assert code == 0, f"the pristine {fmt} checkpoint does not convert: {text}"
        srcs[fmt], refs[fmt] = src, read_back(os.path.join(work, "ref", fmt))
    for i in range(trials):
        fmt = formats[i % len(formats)]
        src = srcs[fmt]
        files = sorted(
            os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs
        )
        rel = rng.choice(files)
        path = os.path.join(src, rel)
        m = random_mutation(rng, os.path.getsize(path))
        t = ForeignTrial(fmt=fmt, file=rel, mutation=m)
        keep = Restorer()
        dst = os.path.join(work, "out", f"{i}")
        try:
            if not keep.damage(path, m):
                continue
            code, text = convert(src, dst)
            got = None
            if code == 0:
                try:
                    got = read_back(dst)
                except Exception as e:  # noqa: BLE001 - a conversion that wrote junk
                    text += f"\nreading the output failed: {type(e).__name__}: {e}"
            t.outcome, t.changed = classify(code, text, got, refs[fmt])
            t.message = text.strip()
        finally:
            keep.undo()
            shutil.rmtree(dst, ignore_errors=True)
        report.trials.append(t)
    return report
