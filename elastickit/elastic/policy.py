"""The layout policy: which (pp, dp, tp) layout the ranks that are left train on.

A pure function of data (no torch, no process group), called on every (re)formation of the
job with the ranks available on each node:

    choice = choose_layout(LayoutRequest(nodes=(1, 1, 1), global_batch=24, micro_batch=2,
                                         limits=ModelLimits(tp_degrees=(1, 2, 4), max_pp=4)))
    choice.layout.text()   # 'pp=1,dp=3,tp=1'
    choice.grad_accum      # 4: 24 samples = dp 3 x 4 microbatches x 2 samples
    choice.active          # (0, 1, 2): the ranks (in member order) the layout uses
    choice.spares          # (): ranks that wait as hot spares

Rules (DESIGN.md section 6):
- keep tp*pp of the previous layout while the model still fits and the ranks allow it;
  a tensor-parallel group never straddles two nodes;
- dp takes what is left: the largest dp whose ranks exist and that divides the number of
  microbatches of a step, so the global batch stays the same (gradient accumulation makes up
  the difference: grad_accum = global_batch / (dp * micro_batch));
- ranks the layout cannot use wait as hot spares;
- when nothing fits, `NoLayoutError` says why in one sentence.
"""

from __future__ import annotations

import dataclasses
import re

from elastickit.checkpoint.errors import RequestError

__all__ = [
    "AXES",
    "Layout",
    "LayoutChoice",
    "LayoutRequest",
    "ModelLimits",
    "NoLayoutError",
    "choose_layout",
    "parse_pins",
]

AXES = ("pp", "dp", "tp")


class NoLayoutError(RequestError):
    """No (pp, dp, tp) layout fits the ranks that are left (one sentence says why)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Degrees of the (pp, dp, tp) mesh, tp innermost (as `elastickit.trainer.TrainLayout`)."""

    pp: int = 1
    dp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{axis} must be a positive int, got {value!r}")

    @property
    def world_size(self) -> int:
        """pp * dp * tp."""
        return self.pp * self.dp * self.tp

    def text(self) -> str:
        """`pp=1,dp=3,tp=1`: every axis, the form of the run directory's files."""
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES)

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse `pp=1,dp=3,tp=1` (missing axes are 1)."""
        return cls(**parse_pins(text))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelLimits:
    """What the model allows, independent of the ranks."""

    tp_degrees: tuple[int, ...] = (1,)
    """Tensor-parallel degrees the model can be split over (heads, kv heads, ffn divisible)."""
    max_pp: int = 1
    """Most pipeline stages (one layer per stage at least)."""
    state_bytes: int = 0
    """Bytes of training state (parameters, gradients, optimizer moments) of the whole model."""

    def __post_init__(self) -> None:
        if not self.tp_degrees or any(t < 1 for t in self.tp_degrees):
            raise ValueError(f"ModelLimits.tp_degrees must be positive ints, got {self.tp_degrees}")
        if self.max_pp < 1:
            raise ValueError(f"ModelLimits.max_pp must be >= 1, got {self.max_pp}")
        if self.state_bytes < 0:
            raise ValueError(f"ModelLimits.state_bytes must be >= 0, got {self.state_bytes}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayoutRequest:
    """The question the policy answers."""

    nodes: tuple[int, ...]
    """Ranks available on each node, in member order (ranks of a node are contiguous)."""
    global_batch: int
    """Samples per optimizer step, kept across every layout."""
    micro_batch: int
    """Samples per microbatch on one dp rank (the memory bound); global_batch is a multiple."""
    limits: ModelLimits = ModelLimits()
    """What the model allows."""
    pins: tuple[tuple[str, int], ...] = ()
    """Axes fixed by `--layout` (e.g. (("tp", 2),)); the others follow the world."""
    previous: Layout | None = None
    """The layout before this change: its tp and pp are kept when they still work."""
    rank_budget_bytes: int | None = None
    """Training state one rank may hold (state_bytes / (pp*dp*tp) must fit); None: any."""

    def __post_init__(self) -> None:
        if any(n < 0 for n in self.nodes):
            raise ValueError(f"LayoutRequest.nodes must be >= 0, got {self.nodes}")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError("LayoutRequest.global_batch and micro_batch must be positive")
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"LayoutRequest.global_batch ({self.global_batch}) must be a multiple of "
                f"micro_batch ({self.micro_batch})"
            )
        for axis, n in self.pins:
            if axis not in AXES or n < 1:
                raise ValueError(f"LayoutRequest.pins: {axis}={n} is not a positive pp/dp/tp degree")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayoutChoice:
    """The policy's answer."""

    layout: Layout
    """The new layout."""
    grad_accum: int
    """Microbatches per step on each dp rank (the pipeline's microbatches under pp)."""
    active: tuple[int, ...]
    """Indices (in member order) of the ranks the layout uses; new rank i is active[i]."""
    spares: tuple[int, ...]
    """Indices of the ranks that wait as hot spares."""


def parse_pins(text: str) -> dict[str, int]:
    """`auto` or `` -> {}; `tp=2` -> {"tp": 2}; `pp=2,tp=2` -> both. ValueError names the item."""
    text = text.strip()
    if text in ("", "auto"):
        return {}
    out: dict[str, int] = {}
    for item in text.split(","):
        m = re.fullmatch(r"\s*([a-z]+)\s*=\s*(\d+)\s*", item)
        if m is None:
            raise ValueError(f"layout item {item!r} in {text!r} is not AXIS=N (e.g. tp=2)")
        axis, n = m.group(1), int(m.group(2))
        if axis not in AXES:
            raise ValueError(f"layout axis {axis!r} in {text!r} is not one of pp, dp, tp")
        if axis in out:
            raise ValueError(f"layout {text!r} names {axis} twice")
        if n < 1:
            raise ValueError(f"layout {text!r}: {axis} must be at least 1")
        out[axis] = n
    return out


def _usable(nodes: tuple[int, ...], tp: int) -> list[int]:
    """Member indices usable with `tp`: whole tp groups inside each node, node by node."""
    out, base = [], 0
    for n in nodes:
        out.extend(range(base, base + (n // tp) * tp))
        base += n
    return out


def _best_dp(req: LayoutRequest, tp: int, pp: int, groups: int) -> int:
    """The largest dp the ranks, the batch and the memory allow (0: none)."""
    microbatches = req.global_batch // req.micro_batch
    pinned = dict(req.pins).get("dp")
    for dp in range(groups // pp, 0, -1):
        if pinned is not None and dp != pinned:
            continue
        if microbatches % dp:
            continue
        if pp > 1 and microbatches // dp < pp:
            continue  # fewer microbatches than stages: the pipeline schedules need one each
        if req.rank_budget_bytes is not None and req.limits.state_bytes > req.rank_budget_bytes * pp * dp * tp:
            continue
        return dp
    return 0


def _candidates(req: LayoutRequest) -> list[tuple[int, int]]:
    """(tp, pp) pairs to try, in order of preference."""
    pins = dict(req.pins)
    tps = [pins["tp"]] if "tp" in pins else sorted(set(req.limits.tp_degrees))
    pps = [pins["pp"]] if "pp" in pins else list(range(1, req.limits.max_pp + 1))
    pairs = [(tp, pp) for tp in tps for pp in pps]
    # Fewer model-parallel ranks first (more data parallelism, less communication), tp before pp.
    pairs.sort(key=lambda p: (p[0] * p[1], p[1]))
    prev = req.previous
    if prev is not None and (prev.tp, prev.pp) in pairs:
        pairs.remove((prev.tp, prev.pp))
        pairs.insert(0, (prev.tp, prev.pp))  # keep tp*pp while it works
    return pairs


def choose_layout(req: LayoutRequest) -> LayoutChoice:
    """The layout for the ranks of `req` (see the module docstring); NoLayoutError if none."""
    total = sum(req.nodes)
    pins = dict(req.pins)
    if total == 0:
        raise NoLayoutError("no ranks are left to train on; start at least one node")
    if "tp" in pins and pins["tp"] not in req.limits.tp_degrees:
        raise NoLayoutError(
            f"--layout tp={pins['tp']}: the model cannot be split over {pins['tp']} tensor-parallel "
            f"ranks (it allows tp in {sorted(req.limits.tp_degrees)}); choose one of those"
        )
    if "pp" in pins and pins["pp"] > req.limits.max_pp:
        raise NoLayoutError(
            f"--layout pp={pins['pp']}: the model has only {req.limits.max_pp} layers to split "
            f"into stages; use pp <= {req.limits.max_pp}"
        )
    best: tuple[int, int, int, list[int]] | None = None  # (tp, pp, dp, usable)
    for tp, pp in _candidates(req):
        usable = _usable(req.nodes, tp)
        dp = _best_dp(req, tp, pp, len(usable) // tp)
        if dp == 0:
            continue
        if best is None:
            best = (tp, pp, dp, usable)
            if req.previous is not None and (tp, pp) == (req.previous.tp, req.previous.pp):
                break  # the previous tp*pp still works: keep it
        elif dp * tp * pp > best[2] * best[0] * best[1]:
            best = (tp, pp, dp, usable)  # another split that puts more ranks to work
    if best is None:
        raise NoLayoutError(_why_none(req, total))
    tp, pp, dp, usable = best
    active = tuple(usable[: pp * dp * tp])
    spares = tuple(i for i in range(total) if i not in set(active))
    return LayoutChoice(
        layout=Layout(pp=pp, dp=dp, tp=tp),
        grad_accum=req.global_batch // (req.micro_batch * dp),
        active=active,
        spares=spares,
    )


def _why_none(req: LayoutRequest, total: int) -> str:
    pins = dict(req.pins)
    per_node = max(req.nodes) if req.nodes else 0
    if "tp" in pins and pins["tp"] > per_node:
        return (
            f"--layout tp={pins['tp']} needs {pins['tp']} ranks inside one node, but no node has more "
            f"than {per_node}; use --layout auto or a smaller tp"
        )
    if "dp" in pins:
        return (
            f"--layout dp={pins['dp']} cannot be kept on {total} rank(s) with a global batch of "
            f"{req.global_batch // req.micro_batch} microbatches; leave dp out of --layout so it can follow the world"
        )
    if req.rank_budget_bytes is not None:
        return (
            f"the model's {req.limits.state_bytes} bytes of training state do not fit {total} rank(s) "
            f"of {req.rank_budget_bytes} bytes each in any layout; add nodes or raise the memory budget"
        )
    return (
        f"no layout of {total} rank(s) (nodes of {list(req.nodes)}) divides the global batch of "
        f"{req.global_batch // req.micro_batch} microbatches with the model split allowed "
        f"(tp in {sorted(req.limits.tp_degrees)}, pp <= {req.limits.max_pp}); change --global-batch or --layout"
    )
