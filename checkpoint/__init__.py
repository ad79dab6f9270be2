"""elastickit.checkpoint: the universal checkpoint format, its writer, integrity and tiers.

Imports nothing else of elastickit (DESIGN.md section 1).
"""
