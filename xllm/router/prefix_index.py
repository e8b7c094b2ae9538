"""The global prefix index: which instances hold which KV blocks, in which tier, from their
KV events.

Keys are the chained block hashes of ``xllm.block_hash``, so the blocks of a prompt are
found by walking its hashes: an instance's match is the deepest of them it holds
(``deepest``). With KV tiers an instance holds a block in its device pool, its host
memory or its disk tier (``protocol.KV_TIERS``), possibly in several; ``prefill_cost``
prices a prompt on an instance by the tier each of its blocks would come from. Entries are
hints: the scheduler that gets the request checks its own cache (and the blocks' tokens)
again.
"""

from __future__ import annotations

from typing import Iterable, Sequence

DEVICE = 0  # the tier of a block in the device pool (KV_TIERS' index)


class PrefixIndex:
    """block hash -> instances holding it (in some tier). Verbs: stored, removed, clear,
    deepest, prefill_cost."""

    def __init__(self) -> None:
        self.holders: dict[int, set[str]] = {}
        self.by_instance: dict[str, dict[int, int]] = {}  # instance -> hash -> bit mask of its tiers

    def stored(self, instance: str, hashes: Iterable[int], tier: int = DEVICE) -> None:
        mine = self.by_instance.setdefault(instance, {})
        bit = 1 << tier
        for h in hashes:
            self.holders.setdefault(h, set()).add(instance)
            mine[h] = mine.get(h, 0) | bit

    def removed(self, instance: str, hashes: Iterable[int], tier: int = DEVICE) -> None:
        mine = self.by_instance.get(instance, {})
        bit = 1 << tier
        for h in hashes:
            tiers = mine.get(h, 0) & ~bit
            if tiers:
                mine[h] = tiers
                continue
            mine.pop(h, None)
            who = self.holders.get(h)
            if who is not None:
                who.discard(instance)
                if not who:
                    del self.holders[h]

    def clear(self, instance: str) -> None:
        """Forget everything ``instance`` held (its cache was reset, or it is gone)."""
        for h in self.by_instance.pop(instance, {}):
            who = self.holders.get(h)
            if who is not None:
                who.discard(instance)
                if not who:
                    del self.holders[h]

    def deepest(self, instance: str, hashes: Sequence[int]) -> int:
        """The depth of the deepest of ``hashes`` that ``instance`` holds in any tier (0: none)."""
        mine = self.by_instance.get(instance)
        if mine:
            for depth in range(len(hashes), 0, -1):
                if hashes[depth - 1] in mine:
                    return depth
        return 0

    def prefill_cost(self, instance: str, hashes: Sequence[int], weights: Sequence[float],
                     depth: int | None = None) -> float:
        """What the prompt of ``hashes`` costs on ``instance``, in blocks of prefill: a block
        it holds costs the weight of its fastest tier (``weights[tier]``: the device's 0, a
        lower tier's load-back cost against computing it); one it does not hold, and every
        block past the deepest it holds (``depth``, found when not given), costs 1."""
        mine = self.by_instance.get(instance, {})
        if depth is None:
            depth = self.deepest(instance, hashes)
        cost = float(len(hashes) - depth)
        for h in hashes[:depth]:
            tiers = mine.get(h, 0)
            cost += weights[(tiers & -tiers).bit_length() - 1] if tiers else 1.0
        return cost

    def __len__(self) -> int:
        return len(self.holders)
