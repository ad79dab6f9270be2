"""A small GPT decoder whose parameters exercise every case of the resharding language.

Parameters, their logical shapes, and how each rank's *local* tensor relates to the logical
tensor once `elastickit.trainer.parallel` has applied a layout (pp, dp, tp). Names are
global FQNs on every pipeline stage (`layers.{i}` keeps its global index, torchtitan-style;
a stage simply lacks the layers, embedding, final norm or head it does not own).

Notation: V = vocab_size, Vp = padded vocab = V rounded up to a multiple of
`vocab_multiple * tp`, D = dim, H = n_heads, K = n_kv_heads (GQA, K < H), d = D // H,
F = ffn_hidden, E = n_experts. "over tp" means rank r of the tp axis holds chunk r of tp
equal chunks. Under FSDP2 every tensor below is further sharded along dim 0 over dp
(`Shard(0)` with `torch.chunk` sizes, so trailing dp ranks may hold fewer rows; when tp also
shards dim 0, FSDP2 places dp as `_StridedShard(0)` over the tp shard; rule
`shard(dim=0, axis=dp)` nested inside tp); under DDP-style replicate it is
`replicate(axis=dp)`.

| FQN | logical shape | local tensor on tp rank r | rule |
| --- | --- | --- | --- |
| tok_embeddings.weight | [V, D] | rows [r*Vp/tp, (r+1)*Vp/tp) of the padded [Vp, D] | shard(dim=0, axis=tp), pad(dim=0, size=V, multiple=vocab_multiple, axis=tp) |
| layers.{i}.attention_norm.weight | [D] | full copy | replicate(axis=tp) |
| layers.{i}.attention.wqkv.weight | [(H+2K)*d, D] = [q; k; v] | [q_r; k_r; v_r], q_r = rows r*H*d/tp.. of q (its H/tp q heads), k_r, v_r likewise (its K/tp kv heads) | fused(dim=0, parts=q:H*d, k:K*d, v:K*d), each part shard(dim=0, axis=tp) |
| layers.{i}.attention.wo.weight | [D, H*d] | columns r*H*d/tp.. | shard(dim=1, axis=tp) |
| layers.{i}.ffn_norm.weight | [D] | full copy | replicate(axis=tp) |
| layers.{i}.feed_forward.w13.weight | [2F, D] = [gate; up] | [gate_r; up_r], each rows r*F/tp.. | fused(dim=0, parts=gate:F, up:F), each part shard(dim=0, axis=tp) |
| layers.{i}.feed_forward.w2.weight | [D, F] | columns r*F/tp.. | shard(dim=1, axis=tp) |
| norm.weight | [D] | full copy | replicate(axis=tp) |
| output.weight | [V, D] (untied) | rows r*Vp/tp.. of the padded [Vp, D] | shard(dim=0, axis=tp), pad(dim=0, size=V, multiple=vocab_multiple, axis=tp) |

With `moe=True` every layer's `feed_forward` is a `MoE` instead:

| FQN | logical shape | local tensor | rule |
| --- | --- | --- | --- |
| layers.{i}.feed_forward.router.weight | [E, D] | full copy | replicate(axis=tp) |
| layers.{i}.feed_forward.experts.w13 | [E, 2F, D] = per expert [gate; up] | full copy | replicate(axis=tp) (expert(axis=ep) once an ep axis exists) |
| layers.{i}.feed_forward.experts.w2 | [E, D, F] | full copy | replicate(axis=tp) |

`elastickit.trainer.rules.model_rules(cfg)` builds exactly these rules (the fused and pad
ones; the others follow from DTensor placements) for `elastickit.Checkpointer(rules=...)`.

On the *DTensor* view, a fused tensor's global tensor is the tp-interleaved order
[q_0; k_0; v_0; q_1; k_1; v_1; ...] (so that plain `Shard(0)` yields [q_r; k_r; v_r]);
`fused_to_tp_order` / `fused_from_tp_order` convert between that and the logical [q; k; v].
Padding rows (V..Vp) of the embedding and head are zero at init, never looked up, and their
logits are sliced off before the loss, so they never influence training.

Pipeline stages hold contiguous layer ranges: stage s of pp owns layers
[s*L/pp, (s+1)*L/pp) (the first L % pp stages get one more), the embedding lives on stage 0,
the final norm and head on the last stage (rule rename with layer offsets is the identity,
since FQNs are global).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CONFIGS",
    "ModelConfig",
    "Transformer",
    "fused_from_tp_order",
    "fused_parts",
    "fused_to_tp_order",
    "init_weights",
    "model_config",
    "padded_vocab",
]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """Shape of the decoder."""

    vocab_size: int
    """Logical vocabulary size V (tokens are in [0, V))."""
    dim: int
    """Model width D."""
    n_layers: int
    """Number of decoder layers."""
    n_heads: int
    """Query heads H."""
    n_kv_heads: int
    """Key/value heads K (grouped-query attention; H % K == 0)."""
    ffn_hidden: int
    """SwiGLU hidden size F."""
    max_seq_len: int
    """Longest sequence the rotary tables cover."""
    vocab_multiple: int = 8
    """The vocab is padded to a multiple of vocab_multiple * tp."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    moe: bool = False
    """Replace every dense SwiGLU by a small mixture of experts."""
    n_experts: int = 4
    """Experts per MoE layer (used when moe=True)."""
    moe_top_k: int = 2
    """Experts each token is routed to (used when moe=True)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be a multiple of n_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.moe and not 1 <= self.moe_top_k <= self.n_experts:
            raise ValueError("ModelConfig.moe_top_k must be between 1 and n_experts")

    @property
    def head_dim(self) -> int:
        """d = D // H."""
        return self.dim // self.n_heads

    def check_tp(self, tp: int) -> None:
        """Raise ValueError if this model cannot be split over `tp` tensor-parallel ranks."""
        for name in ("n_heads", "n_kv_heads", "ffn_hidden"):
            if getattr(self, name) % tp:
                raise ValueError(
                    f"ModelConfig.{name} ({getattr(self, name)}) is not divisible by tp={tp}"
                )

    def num_params(self) -> int:
        """Number of logical parameters (without vocab padding)."""
        d, h, k = self.head_dim, self.n_heads, self.n_kv_heads
        attn = (h + 2 * k) * d * self.dim + self.dim * h * d
        if self.moe:
            ffn = self.n_experts * 3 * self.ffn_hidden * self.dim + self.n_experts * self.dim
        else:
            ffn = 3 * self.ffn_hidden * self.dim
        return (
            2 * self.vocab_size * self.dim + self.n_layers * (attn + ffn + 2 * self.dim) + self.dim
        )


CONFIGS: dict[str, ModelConfig] = {
    # Seconds on a CPU: for tests. V=250 pads to 256, so padding rows exist.
    "tiny": ModelConfig(
        vocab_size=250, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64
    ),
    "tiny-moe": ModelConfig(
        vocab_size=250,
        dim=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=32,
        max_seq_len=64,
        moe=True,
        n_experts=4,
        moe_top_k=2,
    ),
    # About 100M parameters: for benchmarks. V=16003 pads to 16064 (tp=1) or 16128 (tp=2).
    "small": ModelConfig(
        vocab_size=16003,
        dim=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        ffn_hidden=2048,
        max_seq_len=512,
        vocab_multiple=64,
    ),
}


def model_config(name: str) -> ModelConfig:
    """The named config (`tiny`, `tiny-moe`, `small`); ValueError for an unknown name."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(CONFIGS)}") from None


def padded_vocab(cfg: ModelConfig, tp: int) -> int:
    """Vp: the vocab rounded up to a multiple of vocab_multiple * tp."""
    m = cfg.vocab_multiple * tp
    return (cfg.vocab_size + m - 1) // m * m


def fused_parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Fused parameter suffix -> its ordered (part name, rows) along dim 0."""
    d = cfg.head_dim
    parts = {
        "attention.wqkv.weight": [
            ("q", cfg.n_heads * d),
            ("k", cfg.n_kv_heads * d),
            ("v", cfg.n_kv_heads * d),
        ]
    }
    if not cfg.moe:
        parts["feed_forward.w13.weight"] = [("gate", cfg.ffn_hidden), ("up", cfg.ffn_hidden)]
    return parts


def fused_to_tp_order(t: torch.Tensor, sizes: Sequence[int], tp: int, dim: int = 0) -> torch.Tensor:
    """Logical [p0; p1; ...] -> tp-interleaved [p0_0; p1_0; ...; p0_1; p1_1; ...] along dim."""
    if tp == 1:
        return t
    chunks = [part.chunk(tp, dim=dim) for part in t.split(list(sizes), dim=dim)]
    return torch.cat([chunks[p][r] for r in range(tp) for p in range(len(sizes))], dim=dim)


def fused_from_tp_order(
    t: torch.Tensor, sizes: Sequence[int], tp: int, dim: int = 0
) -> torch.Tensor:
    """Inverse of `fused_to_tp_order`."""
    if tp == 1:
        return t
    local = [s // tp for s in sizes]
    per_rank = [c.split(local, dim=dim) for c in t.chunk(tp, dim=dim)]
    return torch.cat([per_rank[r][p] for p in range(len(sizes)) for r in range(tp)], dim=dim)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on [batch, seq, heads, head_dim] (rotate-half form)."""
    seq, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd))
    ang = torch.outer(torch.arange(seq, dtype=torch.float32, device=x.device), inv)
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with one fused QKV projection and grouped-query attention.

    `tp_degree` is set by the tensor-parallel plan: the fused projection then yields this
    rank's [q_r; k_r; v_r] (H/tp query heads and K/tp kv heads).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.tp_degree = 1
        self.wqkv = nn.Linear(
            cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False
        )
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        nh, nkv, hd = (
            self.n_heads // self.tp_degree,
            self.n_kv_heads // self.tp_degree,
            self.head_dim,
        )
        q, k, v = self.wqkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = _rope(q.view(b, s, nh, hd), self.rope_theta)
        k = _rope(k.view(b, s, nkv, hd), self.rope_theta)
        v = v.view(b, s, nkv, hd)
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, nh * hd))


class FeedForward(nn.Module):
    """SwiGLU with one fused gate/up projection: w2(silu(gate) * up)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # local [gate_r; up_r] under tp
        return self.w2(F.silu(gate) * up)


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked tensors (per expert a fused [gate; up])."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.ffn_hidden, cfg.dim))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.ffn_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, D] -> [E, tokens, D] (every expert on every token: tiny and deterministic)."""
        gate, up = torch.einsum("td,efd->etf", x, self.w13).chunk(2, dim=-1)
        return torch.einsum("etf,edf->etd", F.silu(gate) * up, self.w2)


class MoE(nn.Module):
    """A tiny top-k mixture of experts (dense compute, sparse weights: exact and deterministic)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        scores = self.router(flat).softmax(dim=-1)
        top, idx = scores.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(scores).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        out = torch.einsum("te,etd->td", weights, self.experts(flat))
        return out.reshape(b, s, d)


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer: attention then SwiGLU (or MoE), each with a residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward: nn.Module = MoE(cfg) if cfg.moe else FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder. `tp` only sets the vocab padding (Vp); parallelism is applied afterwards.

    forward(tokens [b, s] int64) -> logits [b, s, V] on a full model. On a pipeline stage the
    missing parts are None: a stage without `tok_embeddings` takes hidden states [b, s, D],
    a stage without `output` returns hidden states.
    """

    def __init__(self, cfg: ModelConfig, tp: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_padded = padded_vocab(cfg, tp)
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(self.vocab_padded, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, self.vocab_padded, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        logits = self.output(h)
        if logits.shape[-1] == self.cfg.vocab_size:
            return logits
        # Drop the padding rows' logits; a copy, not a view, so FSDP2's backward hook holds.
        return logits[..., : self.cfg.vocab_size].contiguous()


def _logical_init(fqn: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The logical initial value of one parameter: a function of (seed, FQN) only."""
    if fqn.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(fqn.encode()))
    std = 0.02
    if fqn.endswith(("wo.weight", "w2.weight", "experts.w2")):
        std = 0.02 / math.sqrt(2.0)
    return torch.randn(tuple(shape), generator=g) * std


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialise an unsharded (possibly stage-pruned) model, identically for every layout.

    Values depend only on (seed, FQN, logical shape): padding rows are zero, so a tp=2 model
    (padded to a larger Vp) and a pipeline stage get exactly the single-rank values.
    """
    cfg = model.cfg
    for fqn, p in model.named_parameters():
        if fqn in ("tok_embeddings.weight", "output.weight"):
            p.zero_()
            p[: cfg.vocab_size].copy_(_logical_init(fqn, (cfg.vocab_size, cfg.dim), seed))
        else:
            p.copy_(_logical_init(fqn, p.shape, seed))
