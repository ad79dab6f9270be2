"""Corruption everywhere: flip bits, truncate, delete or zero bytes at random offsets of every
file type elastickit reads, and what must follow.

Our format (rank files, zstd rank files, manifests, node-local files): every mutation is detected
(`elastickit verify` exits 1 naming the file), and a restore falls back to the previous checkpoint,
bit-exact, with a `restore_fallback` event that names the file and the reason. Peer copies are in
`peers.py` (they need two ranks).

Foreign formats (`foreign.py`): one sentence, never a traceback, never a wrong tensor loaded
silently, except where the format has no checksum over the bytes that changed (listed).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

from tests.torture.kills import verify_cli


@dataclass(frozen=True, slots=True, kw_only=True)
class Mutation:
    """One damage to a file.

    Attributes:
        kind: flip (bits at offsets), truncate (at offset), delete, zero (length bytes at offset).
        offsets: byte offsets (flip: one bit each; truncate/zero: the first).
        bits: the bit flipped at each offset (flip).
        length: bytes zeroed (zero).
    """

    kind: str
    offsets: tuple[int, ...] = ()
    bits: tuple[int, ...] = ()
    length: int = 0

    def describe(self) -> str:
        if self.kind == "flip":
            return "flip " + ", ".join(
                f"bit {b} of byte {o}" for o, b in zip(self.offsets, self.bits, strict=True)
            )
        if self.kind == "truncate":
            return f"truncate to {self.offsets[0]} bytes"
        if self.kind == "zero":
            return f"zero {self.length} bytes at {self.offsets[0]}"
        return "delete"


KINDS = ("flip", "flip", "truncate", "delete", "zero")


def random_mutation(rng: random.Random, size: int, kinds: tuple[str, ...] = KINDS) -> Mutation:
    """A mutation that changes a file of `size` bytes (never a no-op)."""
    kind = rng.choice(kinds) if size > 0 else "delete"
    if kind == "flip":
        k = rng.choice((1, 1, 2, 8))
        offsets = tuple(sorted(rng.sample(range(size), min(k, size))))
        return Mutation(kind="flip", offsets=offsets, bits=tuple(rng.randrange(8) for _ in offsets))
    if kind == "truncate":
        return Mutation(kind="truncate", offsets=(rng.randrange(size),))
    if kind == "zero":
        start = rng.randrange(size)
        return Mutation(kind="zero", offsets=(start,), length=rng.randint(1, min(64, size - start)))
    return Mutation(kind="delete")


def apply(path: str, m: Mutation) -> bool:
    """Damage `path`; False when the bytes did not change (zeroing zeros)."""
    if m.kind == "delete":
        os.remove(path)
        return True
    if m.kind == "truncate":
        os.truncate(path, m.offsets[0])
        return True
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        before = bytes(data)
        if m.kind == "flip":
            for o, b in zip(m.offsets, m.bits, strict=True):
                data[o] ^= 1 << b
        else:
            start = m.offsets[0]
            data[start : start + m.length] = bytes(m.length)
        f.seek(0)
        f.write(data)
    return bytes(data) != before


class Restorer:
    """Keeps a pristine copy of each file it damages and puts it back afterwards."""

    def __init__(self) -> None:
        self._saved: dict[str, bytes] = {}

    def damage(self, path: str, m: Mutation) -> bool:
        with open(path, "rb") as f:
            self._saved.setdefault(path, f.read())
        return apply(path, m)

    def undo(self) -> None:
        for path, data in self._saved.items():
            with open(path, "wb") as f:
                f.write(data)
        self._saved.clear()


# -- our format, in one process ---------------------------------------------------------------

VARIANTS = ("persistent", "persistent-zstd", "local")


def _tiers(variant: str, base: str) -> Any:
    from elastickit.checkpoint.tiers import Tiers, TierSpec

    if variant == "persistent":
        return Tiers(memory=None)
    if variant == "persistent-zstd":
        return Tiers(memory=None, persistent=TierSpec(zstd_level=3))
    return Tiers(memory=None, local=TierSpec(path=os.path.join(base, "local")), persistent=None)


def _model() -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _digest(model: Any, optim: Any, data: Any) -> dict[str, str]:
    import xxhash

    out = {
        f"model/{k}": xxhash.xxh3_64_hexdigest(v.numpy().tobytes())
        for k, v in model.state_dict().items()
    }
    for i, st in optim.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim/{i}/{k}"] = xxhash.xxh3_64_hexdigest(v.numpy().tobytes())
    out["data"] = json.dumps(data, sort_keys=True)
    return out


@dataclass
class Pristine:
    """Three committed checkpoints (steps 1-3) of one variant and the digest of each step."""

    variant: str
    root: str
    step_dirs: dict[int, str]
    digests: dict[int, dict[str, str]]


def build(base: str, variant: str) -> Pristine:
    """Save steps 1, 2 and 3 of a small model with AdamW in this process."""
    import torch

    import elastickit as ek

    root = os.path.join(base, "ckpt")
    model, optim = _model()
    digests = {}
    with ek.Checkpointer(root, tiers=_tiers(variant, base), lazy="never") as ck:
        for step in range(1, 4):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
            optim.zero_grad()
            model(x).pow(2).mean().backward()
            optim.step()
            data = {"pos": step}
            ck.save(step, {"model": model, "optim": optim, "data": data})
            ck.wait()  # every step reaches the tier (a busy tier would skip to the newest)
            digests[step] = _digest(model, optim, data)
    search = os.path.join(base, "local") if variant == "local" else root
    dirs = {}
    for dirpath, dirnames, _ in os.walk(search):
        for d in dirnames:
            if d.startswith("step-"):
                dirs[int(d[5:])] = os.path.join(dirpath, d)
    assert sorted(dirs) == [1, 2, 3], f"expected steps 1-3 under {search}, found {sorted(dirs)}"
    return Pristine(variant=variant, root=root, step_dirs=dirs, digests=digests)


@dataclass
class Trial:
    """One damaged file of the newest checkpoint and what elastickit made of it."""

    variant: str
    file: str
    mutation: Mutation
    verify_exit: int = -1
    verify_names_file: bool = False
    restored_step: int | None = None
    bit_exact: bool = False
    event_reason: str = ""
    problems: list[str] = field(default_factory=list)


def _restore(p: Pristine, base: str) -> tuple[int, dict[str, str], list[dict[str, Any]], str]:
    from elastickit.checkpoint.events import read_events

    import elastickit as ek

    events = os.path.join(p.root, "events.jsonl")
    before = len(read_events(events))
    model, optim = _model()
    for q in model.parameters():  # a state unlike any saved one
        q.data.fill_(7.0)
    state: dict[str, Any] = {"model": model, "optim": optim, "data": {"pos": -1}}
    error = ""
    step = -1
    try:
        with ek.Checkpointer(p.root, tiers=_tiers(p.variant, base)) as ck:
            step = ck.restore(state)
    except Exception as e:  # noqa: BLE001 - reported as a problem by the caller
        error = f"{type(e).__name__}: {e}"
    return step, _digest(model, optim, state["data"]), read_events(events)[before:], error


def trial(p: Pristine, base: str, rng: random.Random) -> Trial:
    """Damage one file of step 3 at random; check verify and restore; undo the damage."""
    d = p.step_dirs[3]
    name = rng.choice(sorted(os.listdir(d)))
    path = os.path.join(d, name)
    m = random_mutation(rng, os.path.getsize(path))
    t = Trial(variant=p.variant, file=name, mutation=m)
    keep = Restorer()
    if not keep.damage(path, m):
        keep.undo()
        t.problems.append("the mutation changed nothing (harness error)")
        return t
    try:
        code, out = verify_cli(d)
        t.verify_exit = code
        t.verify_names_file = name in out
        if code != 1:
            t.problems.append(f"verify exit {code} (want 1): {out.strip()[-300:]}")
        elif not t.verify_names_file:
            t.problems.append(f"verify does not name {name}: {out.strip()[-300:]}")
        if "Traceback" in out:
            t.problems.append(f"verify printed a traceback: {out[-500:]}")
        step, dig, events, error = _restore(p, base)
        t.restored_step = step
        if error:
            t.problems.append(f"restore raised {error}")
        elif step != 2:
            t.problems.append(f"restore picked step {step}, want 2 (step 3 is damaged)")
        else:
            t.bit_exact = dig == p.digests[2]
            if not t.bit_exact:
                t.problems.append("restore of step 2 is not bit-exact")
        fallbacks = [
            e for e in events if e.get("type") == "restore_fallback" and e.get("step") == 3
        ]
        manifest_gone = name == "manifest.json" and m.kind == "delete"
        if manifest_gone:
            pass  # without its manifest step 3 was never committed: nothing to fall back from
        elif not fallbacks:
            t.problems.append("no restore_fallback event for step 3")
        else:
            t.event_reason = fallbacks[0].get("reason", "")
            if name not in t.event_reason:
                t.problems.append(f"the fallback reason does not name {name}: {t.event_reason}")
    finally:
        keep.undo()
    return t


@dataclass
class OursReport:
    trials: list[Trial] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [
            f"{t.variant} {t.file} ({t.mutation.describe()}): {p}"
            for t in self.trials
            for p in t.problems
        ]

    def table(self) -> dict[tuple[str, str], dict[str, int]]:
        """(variant, file type) -> {"trials", "detected", "fell back bit-exact"}."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for t in self.trials:
            ftype = "manifest" if t.file == "manifest.json" else t.file.split(".", 1)[1]
            row = out.setdefault((t.variant, ftype), {"trials": 0, "detected": 0, "fell_back": 0})
            row["trials"] += 1
            row["detected"] += t.verify_exit == 1 and t.verify_names_file
            row["fell_back"] += t.restored_step == 2 and t.bit_exact
        return out


def ours_campaign(
    work: str, *, trials: int, seed: int, variants: tuple[str, ...] = VARIANTS
) -> OursReport:
    """`trials` damages spread over the variants, each on a pristine set of checkpoints."""
    rng = random.Random(seed)
    report = OursReport()
    built = {v: build(os.path.join(work, v), v) for v in variants}
    for i in range(trials):
        v = variants[i % len(variants)]
        report.trials.append(trial(built[v], os.path.join(work, v), rng))
    return report
