"""The resharding rules of the reference decoder (DESIGN.md section 3), from its config.

They say what DTensor placements cannot: the fused QKV and gate/up tensors hold, on tp rank r,
[q_r; k_r; v_r] and [gate_r; up_r] (`fused`), and the embedding and head carry vocabulary
padding to a multiple of vocab_multiple * tp (`pad`). Everything else (row/column shards over
tp, FSDP2 shards over dp, replicated norms) follows from the placements. Optimizer moments
(exp_avg, exp_avg_sq) are laid out like their parameters and get the same rules. Checkpoints
saved with these rules store logical tensors (`...wqkv.weight:q` etc., unpadded vocab), so a
restore at another (dp, tp) layout reads exactly its pieces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .model import ModelConfig, fused_parts

if TYPE_CHECKING:
    from elastickit.reshard.layout import ParallelLayout
    from elastickit.reshard.rules import RuleSet

    from .parallel import TrainLayout

__all__ = ["model_rules", "parallel_layout"]


def _targets(pattern: str) -> list[str]:
    """The parameter and its two AdamW moments (not the scalar `step`)."""
    return [
        f"model/{pattern}",
        f"optim/state/{pattern}/exp_avg",
        f"optim/state/{pattern}/exp_avg_sq",
    ]


def model_rules(cfg: ModelConfig) -> RuleSet:
    """The RuleSet for `cfg` (the same at every layout: sizes come from the mesh)."""
    from elastickit.reshard.rules import RuleSet, fused, pad, rule, shard

    vocab = _targets("tok_embeddings.weight") + _targets("output.weight")
    rules = [rule(vocab, shard(0, "tp"), pad(0, cfg.vocab_size, cfg.vocab_multiple, "tp"))]
    for suffix, parts in fused_parts(cfg).items():
        rules.append(rule(_targets("layers.*." + suffix), shard(0, "tp"), fused(0, dict(parts))))
    return RuleSet(tuple(rules))


def parallel_layout(layout: TrainLayout) -> ParallelLayout:
    """The trainer's (pp, dp, tp) layout as elastickit.reshard's ParallelLayout (same rank order)."""
    from elastickit.reshard.layout import ParallelLayout

    return ParallelLayout(pp=layout.pp, dp=layout.dp, tp=layout.tp)
