"""Drivers: the save scheduling (snapshots flowing down the tiers in the background) and the
one-call save and restore over any `storage.tier.Tier`."""
