"""Storage: where committed steps live. One small protocol (`tier.Tier`), implemented by a
directory root (`files.DirTier`), a node-local root with buddy copies (`node.NodeTier`) and an
object-storage root (`objstore.ObjectRoot`); the memory tier is `memory.MemoryTier`.
"""
