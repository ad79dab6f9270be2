"""elastickit.monitor: probes on the collectives, per-step summaries, the anomaly detector.

Imports nothing else of elastickit (DESIGN.md section 1).
"""
