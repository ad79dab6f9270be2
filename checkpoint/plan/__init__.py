"""Plans, pure and typed: which rank writes which pieces (dedup), the manifest built from the
gathered plans, and matching a live state against a manifest. Used by the save driver, by
`reshard` and by the converters; imports only the format.
"""
