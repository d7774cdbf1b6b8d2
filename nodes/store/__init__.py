"""What a built tree looks like on disk and how it is read: the tree and node records
(:mod:`nodes.store.tree`), adapters in PEFT format (:mod:`nodes.store.adapters`), versioned
adapters and the served snapshot (:mod:`nodes.store.versions`), and content digests
(:mod:`nodes.store.digest`). Nothing here trains or serves.
"""

__all__: list[str] = []
