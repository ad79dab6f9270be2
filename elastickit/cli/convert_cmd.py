"""`elastickit convert SRC DST [--from FMT] [--to FMT]`: between elastickit, PyTorch DCP and a
consolidated Hugging Face safetensors model (more sources register in reshard.adapters)."""

from __future__ import annotations

import contextlib

import typer

from ._console import err, human_bytes, out, progress
from ._errors import handled


def _size(text: str) -> int:
    units = {
        "": 1,
        "B": 1,
        "K": 2**10,
        "KB": 2**10,
        "M": 2**20,
        "MB": 2**20,
        "G": 2**30,
        "GB": 2**30,
    }
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    unit = t[len(num) :]
    if unit not in units:
        raise ValueError(text)
    return int(float(num) * units[unit])


@handled
def convert(
    src: str = typer.Argument(..., help="The source checkpoint directory."),
    dst: str = typer.Argument(
        ...,
        help="A new (or empty) directory outside SRC; with --to elastickit a checkpoint root.",
    ),
    from_: str = typer.Option(
        "auto", "--from", help="Source format: auto, elastickit, dcp, or a registered adapter."
    ),
    to: str = typer.Option(
        "elastickit",
        "--to",
        help="Target format: elastickit, dcp, safetensors or deepspeed-universal.",
    ),
    max_shard_size: str = typer.Option(
        "5GB", "--max-shard-size", help="With --to safetensors: the largest shard, e.g. 5GB."
    ),
    rules: str = typer.Option(
        None, "--rules", help="A TOML rules file stored in the output (with --to elastickit)."
    ),
    trust_pickle: bool = typer.Option(
        False,
        "--trust-pickle",
        help="DeepSpeed sources: fully unpickle .pt files (only files you trust).",
    ),
) -> None:
    """Convert a checkpoint to another format through elastickit's logical view."""
    from elastickit.checkpoint.errors import RequestError
    from elastickit.checkpoint.paths import is_url, location
    from elastickit.reshard.convert import convert as run

    src, dst = location(src, what="SRC"), location(dst, what="DST")
    ruleset = None
    if rules:  # the rules module imports torch; --to deepspeed-universal runs without it
        from elastickit.reshard.rules import load_rules

        ruleset = load_rules(rules)
    if ruleset is not None and to != "elastickit":
        raise RequestError(f"--rules is stored with --to elastickit only, not --to {to}")
    try:
        limit = _size(max_shard_size)
    except (ValueError, OverflowError):
        raise RequestError(
            f"--max-shard-size {max_shard_size!r} is not a size such as 500MB or 5GB"
        ) from None
    options = {"trust_pickle": True} if trust_pickle else {}
    # A URL source or destination is staged through a local temporary directory (remote.py).
    # Only then is remote (and with it torch) imported: --to deepspeed-universal runs without it.
    with contextlib.ExitStack() as stack, progress() as bar:
        src_here, dst_here = src, dst
        if is_url(src):
            from elastickit.remote import local_source

            src_here = stack.enter_context(local_source(src))
        if is_url(dst):
            from elastickit.remote import upload_destination

            dst_here = stack.enter_context(upload_destination(dst, sources=[src]))
        report = run(
            src_here,
            dst_here,
            source=from_,
            target=to,
            max_shard_bytes=limit,
            rules=ruleset,
            on_progress=bar,
            **options,
        )
    if report.left_out:
        groups: dict[str, int] = {}
        for name in report.left_out:
            top = name.partition("/")[0]
            groups[top] = groups.get(top, 0) + 1
        what = ", ".join(f"{top}/: {n}" for top, n in sorted(groups.items()))
        err.print(
            f"note: left out {len(report.left_out)} of "
            f"{report.num_tensors + len(report.left_out)} tensors ({what}) and the step: a "
            "Hugging Face safetensors model holds the model weights only; use --to elastickit "
            "or --to dcp to keep the optimizer state",
            markup=False,
            soft_wrap=True,
        )
    resume = f"; resume with --ckpt {dst}" if to == "elastickit" else ""
    out.print(
        f"converted {src} ({report.source_format}) -> {dst} ({report.target_format}): "
        f"{report.num_tensors} tensors, {human_bytes(report.total_bytes)}, "
        f"{len(report.files)} file(s){resume}"
    )
