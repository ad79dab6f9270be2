"""elastickit.reshard: parallel layouts, the resharding language, the planner and the executor.

- `layout`: ParallelLayout (dp, tp, pp, cp, ep, zero; rank <-> coordinates; `tp=2,pp=2,dp=2`).
- `rules`: the language of DESIGN.md section 3 (shard, replicate, pad, fused, rename, expert,
  flat), RuleSet.piece_rule for the Checkpointer, TOML and JSON forms.
- `planner` (pure) and `executor` (memory-mapped, checksummed streaming).
- `offline`: `elastickit reshard` (plan or rewrite a checkpoint for another layout).
- `convert` and `adapters`: other formats through one logical view (DCP, safetensors, DeepSpeed).
- `virtual`: every rank of a layout in one process (tests, benchmarks, tools).

Imports only the format from `elastickit.checkpoint` (DESIGN.md section 1).
"""
