"""The checkpoint format (DESIGN.md section 2): manifest, items, safetensors rank files, the
object-tree codec, the step-directory layout and the atomic commit. Imports nothing above it.
"""
