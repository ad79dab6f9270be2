"""A deterministic synthetic token stream addressed by global sample index, and its loader.

Sample i is a function of (seed, i) only: a sequence that counts upward modulo the vocab by a
stride of 1, 2 or 3 chosen per sample, with 10% of tokens replaced by noise. A model learns
it quickly (the loss visibly falls within a few dozen steps), and any rank can produce any
sample without reading anything.

The loader's whole state is the global index of the next unseen sample. A step consumes
samples [i, i + global_batch); data-parallel rank r of dp takes the contiguous slice
[i + r*B/dp, i + (r+1)*B/dp). So the union over dp ranks of one step's samples is the same for
every layout, and a restore at any layout continues with the next unseen samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["TokenLoader", "TokenStream"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TokenStream:
    """The infinite, random-access sample stream."""

    vocab_size: int
    """Tokens lie in [0, vocab_size)."""
    seq_len: int
    """Each sample has seq_len + 1 tokens (inputs and shifted targets)."""
    seed: int = 0
    """Selects the stream."""
    noise: float = 0.1
    """Fraction of tokens replaced by uniform noise."""

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"TokenStream.vocab_size must be at least 2, got {self.vocab_size}")
        if self.seq_len < 1:
            raise ValueError(f"TokenStream.seq_len must be positive, got {self.seq_len}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"TokenStream.noise must be in [0, 1], got {self.noise}")

    def sample(self, index: int) -> torch.Tensor:
        """Sample `index` as int64 [seq_len + 1]."""
        if index < 0:
            raise ValueError(f"sample index must be non-negative, got {index}")
        g = torch.Generator().manual_seed(self.seed * 0x9E3779B1 + index)
        n = self.seq_len + 1
        start = int(torch.randint(self.vocab_size, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        tokens = (start + stride * torch.arange(n)) % self.vocab_size
        noisy = torch.rand(n, generator=g) < self.noise
        return torch.where(noisy, torch.randint(self.vocab_size, (n,), generator=g), tokens)

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Samples [start, start + count) as int64 [count, seq_len + 1]."""
        return torch.stack([self.sample(start + j) for j in range(count)])


class TokenLoader:
    """Yields this data-parallel rank's share of each global batch; Stateful (DCP protocol).

    `state_dict()` is `{"sample_index": i}`, the global index of the next unseen sample; it
    is the same on every rank and does not depend on the layout.
    """

    def __init__(
        self, stream: TokenStream, *, global_batch: int, dp_rank: int = 0, dp_size: int = 1
    ) -> None:
        if global_batch <= 0 or global_batch % dp_size:
            raise ValueError(
                f"global_batch ({global_batch}) must be a positive multiple of dp ({dp_size})"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        self.stream = stream
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.sample_index = 0

    @property
    def local_batch(self) -> int:
        """Samples per step on this dp rank."""
        return self.global_batch // self.dp_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [local_batch, seq_len]; advances by one global batch."""
        start = self.sample_index + self.dp_rank * self.local_batch
        data = self.stream.batch(start, self.local_batch)
        self.sample_index += self.global_batch
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """{"sample_index": global index of the next unseen sample}."""
        return {"sample_index": self.sample_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at state["sample_index"] (any layout)."""
        index = state.get("sample_index")
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"loader state needs a non-negative int 'sample_index', got {index!r}")
        self.sample_index = index
