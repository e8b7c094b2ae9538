"""The global prefix index: which instances hold which KV blocks, from their KV events.

Keys are the chained block hashes of ``xllm.block_hash``, so the blocks of a prompt are
found by walking its hashes: an instance's match is the deepest of them it holds
(``deepest``). Entries are hints: the scheduler that gets the request checks its own
cache (and the blocks' tokens) again.
"""

from __future__ import annotations

from typing import Iterable, Sequence


class PrefixIndex:
    """block hash -> instances holding it. Verbs: stored, removed, clear, deepest."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}
        self.by_instance: dict[str, set[int]] = {}

    def stored(self, instance: str, hashes: Iterable[int]) -> None:
        mine = self.by_instance.setdefault(instance, set())
        for h in hashes:
            self.holders.setdefault(h, set()).add(instance)
            mine.add(h)

    def removed(self, instance: str, hashes: Iterable[int]) -> None:
        mine = self.by_instance.get(instance, set())
        for h in hashes:
            mine.discard(h)
            who = self.holders.get(h)
            if who is not None:
                who.discard(instance)
                if not who:
                    del self.holders[h]

    def clear(self, instance: str) -> None:
        """Forget everything ``instance`` held (its cache was reset, or it is gone)."""
        self.removed(instance, list(self.by_instance.pop(instance, ())))

    def deepest(self, instance: str, hashes: Sequence[int]) -> int:
        """The depth of the deepest of ``hashes`` that ``instance`` holds (0: none)."""
        mine = self.by_instance.get(instance)
        if mine:
            for depth in range(len(hashes), 0, -1):
                if hashes[depth - 1] in mine:
                    return depth
        return 0

    def __len__(self) -> int:
        return len(self.holders)
