"""elastickit.reshard: parallel layouts, the resharding language, the planner and the executor.

Imports only the format from `elastickit.checkpoint` (DESIGN.md section 1).
"""
