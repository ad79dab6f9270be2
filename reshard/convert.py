"""Conversion between checkpoint formats through the logical view (`elastickit convert`).

Sources come from the adapter registry (`adapters.registry`: elastickit, dcp, and whatever else
registers, such as deepspeed). Targets:

- `elastickit`: a one-rank elastickit checkpoint (`<dst>/step-<8 digits>/`), loadable into any
  layout by the planner.
- `dcp`: a directory that `torch.distributed.checkpoint.load` reads (DCP's flattened keys are the
  logical names).
- `safetensors`: a consolidated Hugging Face-style model: `model-0000i-of-0000n.safetensors`
  shards of at most `max_shard_bytes` and `model.safetensors.index.json`. Only model weights are
  exported: when names carry a `model/` prefix, only those, with the prefix stripped; otherwise
  every tensor outside the optimizer, scheduler, dataloader and train-state entries
  (`NOT_MODEL`, torchtitan's names).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from elastickit.checkpoint.errors import ElastickitError, RequestError
from elastickit.checkpoint.format.codec import place_tensors
from elastickit.checkpoint.format.integrity import commit_step, fsync_dir
from elastickit.checkpoint.format.manifest import (
    DTYPE_SIZES,
    MANIFEST_NAME,
    LayoutRecord,
    rank_file_name,
    step_dir_name,
)

if TYPE_CHECKING:
    from .adapters.source import LogicalSource
    from .rules import RuleSet

TARGETS = ("elastickit", "dcp", "safetensors", "deepspeed-universal")
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConvertReport:
    """What a conversion wrote.

    Attributes:
        left_out: the source's logical tensors the target has no place for (a safetensors
            model keeps the model weights only: the optimizer state is left out).
    """

    source_format: str
    target_format: str
    num_tensors: int
    total_bytes: int
    files: tuple[str, ...]
    left_out: tuple[str, ...] = ()


def convert(
    src: str,
    dst: str,
    *,
    source: str = "auto",
    target: str = "elastickit",
    max_shard_bytes: int = 5 * 2**30,
    rules: RuleSet | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    **options: Any,
) -> ConvertReport:
    """Convert checkpoint `src` (format `source`) into `dst` (format `target`).

    `on_progress("reading", done, total)` is called after each tensor read (for a progress bar).

    `rules` (with target elastickit) are stored in the new manifest, so that `elastickit reshard`
    later knows how the model's tensors split; without them, the source's rules are kept where
    it has some (an elastickit checkpoint, or a DCP directory elastickit wrote). The step is
    kept too (DCP: see `adapters.dcp`)."""
    if target not in TARGETS:
        raise RequestError(f"unknown target format {target!r}; use one of {', '.join(TARGETS)}")
    if target == "deepspeed-universal":
        return _to_deepspeed_universal(src, dst, source, **options)
    from .adapters.registry import detect_format, open_source
    from .destination import check_destination, staged_output

    if target == "safetensors" and max_shard_bytes < 1:
        raise RequestError(f"--max-shard-size must be positive, got {max_shard_bytes} bytes")
    check_destination(src, dst)  # before a byte of the source is read
    fmt = detect_format(src) if source == "auto" else source
    try:
        reader = open_source(src, fmt, **options)
    except ElastickitError:
        actual = _detected(src)
        if actual is None or actual == fmt:
            raise
        raise RequestError(
            f"{src} is a {actual} checkpoint, not {fmt}; use --from {actual} (or leave --from out)",
            path=src,
        ) from None
    if on_progress is not None:
        names = list(reader.tensors())
        total = len(model_weights(names)) if target == "safetensors" else len(names)
        reader = _Counting(reader, on_progress, total)
    try:
        # Written into a hidden sibling and renamed onto `dst` when complete: a crash never
        # leaves a half conversion under the destination's name.
        left_out: tuple[str, ...] = ()
        with staged_output([src, getattr(reader, "path", None) or src], dst) as out:
            if target == "safetensors":
                files, n, size = _to_safetensors(reader, out, max_shard_bytes)
                kept = set(model_weights(list(reader.tensors())).values())
                left_out = tuple(sorted(set(reader.tensors()) - kept))
            elif target == "dcp":
                files, n, size = _to_dcp(reader, out)
            else:
                files, n, size = _to_elastickit(reader, out, rules)
    finally:
        reader.close()
    return ConvertReport(
        source_format=fmt,
        target_format=target,
        num_tensors=n,
        total_bytes=size,
        files=tuple(files),
        left_out=left_out,
    )


class _Counting:
    """A `LogicalSource` that reports each tensor it reads to `on_progress`."""

    def __init__(
        self, inner: LogicalSource, on_progress: Callable[[str, int, int], None], total: int
    ) -> None:
        self.inner, self.on_progress, self.total, self.done = inner, on_progress, total, 0
        self.step, self.rules = inner.step, inner.rules
        self.path = getattr(inner, "path", None)

    def tensors(self) -> dict[str, Any]:
        return self.inner.tensors()

    def read(self, name: str) -> Any:
        t = self.inner.read(name)
        self.done += 1
        self.on_progress("reading", self.done, self.total)
        return t

    def objects(self) -> dict[str, Any]:
        return self.inner.objects()

    def close(self) -> None:
        self.inner.close()


def _detected(path: str) -> str | None:
    """The format `path` is, by the registered detectors (None when none accepts it)."""
    from .adapters.registry import detect_format

    try:
        return detect_format(path)
    except RequestError:
        return None


def _to_deepspeed_universal(src: str, dst: str, source: str, *, tag: str | None = None,
                            trust_pickle: bool = False, **_: Any) -> ConvertReport:
    """DeepSpeed's universal format straight from a DeepSpeed checkpoint (no logical detour, no
    torch import: the CLI's `--to deepspeed-universal` starts in a fraction of a second)."""
    from .adapters.deepspeed import DeepSpeedCheckpoint, is_deepspeed_checkpoint
    from .adapters.deepspeed_universal import write_universal

    if source not in ("auto", "deepspeed") or not is_deepspeed_checkpoint(src):
        raise RequestError(
            f"--to deepspeed-universal needs a DeepSpeed checkpoint (--from deepspeed); {src} is not one",
            path=src)
    from .adapters.deepspeed import resolve_folder
    from .destination import check_destination

    # DeepSpeed keeps a universal checkpoint next to its tag, in the save_dir (with
    # `latest_universal`): only the tag folder read is off limits, not the save_dir.
    folder, _ = resolve_folder(src, tag)
    final = check_destination(folder, dst)
    if os.path.isdir(final):
        os.rmdir(final)  # write_universal creates it
    with DeepSpeedCheckpoint(src, tag=tag, trust_pickle=trust_pickle) as ck:
        report = write_universal(ck, final)
    files = sorted(os.path.relpath(os.path.join(d, f), dst) for d, _, fs in os.walk(dst) for f in fs)
    return ConvertReport(source_format="deepspeed", target_format="deepspeed-universal",
                         num_tensors=report.num_params, total_bytes=report.bytes_written, files=tuple(files))


#: Top-level states that hold no model weights, in checkpoints whose model has no `model/`
#: prefix (torchtitan's DCP checkpoints keep the model's keys at the top, beside these).
NOT_MODEL = ("optimizer", "optim", "lr_scheduler", "lr_schedulers", "dataloader", "train_state")


def model_weights(names: list[str]) -> dict[str, str]:
    """Exported key -> logical name: `model/x` -> `x` when any name has the prefix; else every
    name outside the states in `NOT_MODEL` (optimizer, scheduler, data, train state)."""
    if any(n.startswith("model/") for n in names):
        return {n[len("model/") :]: n for n in sorted(names) if n.startswith("model/")}
    return {n: n for n in sorted(names) if n.split("/", 1)[0] not in NOT_MODEL}


def _to_safetensors(
    reader: LogicalSource, dst: str, max_shard_bytes: int
) -> tuple[list[str], int, int]:
    from safetensors.torch import save_file

    infos = reader.tensors()
    keys = model_weights(list(infos))
    sizes = {k: math.prod(infos[n].shape) * DTYPE_SIZES[infos[n].dtype] for k, n in keys.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for k in keys:  # greedy, in name order; a tensor larger than the limit gets its own shard
        if shards[-1] and used + sizes[k] > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += sizes[k]
    n = len(shards)
    weight_map: dict[str, str] = {}
    files = []
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {k: reader.read(keys[k]).contiguous() for k in group}
        save_file(tensors, os.path.join(dst, fname), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(group, fname))
        files.append(fname)
    total = sum(sizes.values())
    with open(os.path.join(dst, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*files, INDEX_NAME], len(keys), total


def nest(leaves: dict[str, Any]) -> dict[str, Any]:
    """A nested dict from `a/b/c`-style paths (the inverse of elastickit's state flattening)."""
    root: dict[str, Any] = {}
    for path, value in leaves.items():
        *parents, last = path.split("/")
        node = root
        for p in parents:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise RequestError(
                    f"names {p!r} and {path!r} collide when nested; the checkpoint cannot be nested"
                )
            node = nxt
        node[last] = value
    return root


def _to_dcp(reader: LogicalSource, dst: str) -> tuple[list[str], int, int]:
    import warnings

    import torch.distributed.checkpoint as dcp

    from .adapters.dcp import RESERVED, RULES_ENTRY, STEP_ENTRY

    infos = reader.tensors()
    leaves: dict[str, Any] = _dcp_leaves(reader.objects())
    taken = [n for n in [*leaves, *infos] if n == RESERVED or n.startswith(RESERVED + "/")]
    if taken:
        raise RequestError(
            f"the source has state {taken[0]!r}, but convert --to dcp keeps the step and rules under "
            f"{RESERVED!r}; rename that state first"
        )
    # DCP has no field for the step and the rules: plain non-tensor entries keep them.
    leaves[STEP_ENTRY] = int(reader.step)
    if reader.rules:
        leaves[RULES_ENTRY] = json.dumps(list(reader.rules))
    leaves.update({n: reader.read(n) for n in sorted(infos)})
    total = sum(leaves[n].numel() * leaves[n].element_size() for n in infos)
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: we mean it
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(nest(leaves), storage_writer=dcp.FileSystemWriter(dst), no_dist=True)
    return sorted(os.listdir(dst)), len(infos), total


def _dcp_leaves(objects: dict[str, Any]) -> dict[str, Any]:
    """The non-tensor entries DCP would make of an objects tree, keyed by path, as Python values.

    DCP (`torch.distributed.checkpoint._traverse`) walks into dicts, and into a list only when
    something inside it is a tensor or a dict; any other list, every tuple, and every scalar is
    one entry. The same walk here puts each value back at the key it had (Adam's `betas` stays
    one tuple, a dataloader's bytes stay bytes), decoded from the manifest's tags.
    """
    from elastickit.checkpoint.format.values import TENSOR_TAG, TUPLE_TAG, decode, tag_of

    out: dict[str, Any] = {}

    def has_tensor(v: Any) -> bool:
        if tag_of(v) == TENSOR_TAG:
            return True
        if isinstance(v, dict):
            return any(has_tensor(x) for x in v.values())
        return isinstance(v, list) and any(has_tensor(x) for x in v)

    def terminal(v: list[Any]) -> bool:
        for x in v:
            if tag_of(x) == TENSOR_TAG or (isinstance(x, dict) and tag_of(x) is None):
                return False
            if isinstance(x, list) and not terminal(x):
                return False
        return True

    def walk(v: Any, path: str) -> None:
        tag = tag_of(v)
        if tag == TENSOR_TAG:
            return  # written from the tensors
        if tag is not None or (isinstance(v, list) and terminal(v)) or not isinstance(v, dict | list):
            if tag == TUPLE_TAG and has_tensor(v[TUPLE_TAG]):
                raise RequestError(f"entry {path!r} is a tuple holding tensors, which DCP would store as a pickle; "
                                   "convert --to dcp cannot write it")
            out[path] = decode(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{path}/{k}" if path else str(k))
        else:
            for i, x in enumerate(v):
                walk(x, f"{path}/{i}")

    walk(objects, "")
    return out


def _to_elastickit(
    reader: LogicalSource, dst: str, rules: RuleSet | None = None
) -> tuple[list[str], int, int]:
    """A one-rank checkpoint root `dst/step-<step>/`, written and committed as the format says
    (the rank file fsynced, then the manifest last)."""
    from elastickit.checkpoint.format.items import LogicalSpec, Piece, SaveItem
    from elastickit.checkpoint.format.stfile import st_dtype, write_file
    from elastickit.checkpoint.plan.save import build_manifest, describe_items, plan_dedup

    infos = reader.tensors()
    items = []
    for n in sorted(infos):
        t = reader.read(n)
        spec = LogicalSpec(
            name=n, dtype=st_dtype(t.dtype, what=f"tensor {n!r}"), shape=tuple(t.shape)
        )
        items.append(
            SaveItem(
                key=n,
                tensor=t.detach().cpu().contiguous(),
                pieces=(Piece.whole(n, (0,) * t.dim(), tuple(t.shape)),),
                specs=(spec,),
            )
        )
    step_dir = os.path.join(dst, step_dir_name(reader.step))
    os.makedirs(step_dir, exist_ok=True)
    record = None
    if items:
        record = write_file(os.path.join(step_dir, rank_file_name(0)), [(it.key, it.tensor) for it in items])
        fsync_dir(step_dir)
    # The objects tree tags every tensor where elastickit's state flattening would put it, so
    # that `Checkpointer.restore({"model": model, ...})` finds it; lists (param groups) stay lists.
    manifest = build_manifest(
        step=reader.step,
        dedup=plan_dedup([describe_items(items)]),
        records=[record],
        layout=LayoutRecord(axes=(("dp", 1),)),
        rules=rules.to_json() if rules is not None else reader.rules,
        objects=place_tensors(reader.objects(), sorted(infos)),
        framework={"converted": "true"},
    )
    commit_step(step_dir, manifest)
    fsync_dir(dst)
    rel = os.path.relpath(step_dir, dst)
    return (
        [os.path.join(rel, f) for f in sorted(manifest.files)] + [os.path.join(rel, MANIFEST_NAME)],
        len(items),
        manifest.total_bytes,
    )
