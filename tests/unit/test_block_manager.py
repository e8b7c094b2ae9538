"""Block manager: random allocate / grow / cache / free / evict sequences keep it consistent."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xllm.scheduler.block_manager import BlockManager

BS = 4


class Owner:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.computed = 0
        self.num_cached_blocks = 0

    def known_token_ids(self):
        return self.tokens


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=24, block_size=BS)
        self.owners: list[Owner] = []

    @rule(prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]),
          tail=st.lists(st.integers(1, 6), min_size=1, max_size=12))
    def admit(self, prefix, tail):
        o = Owner(prefix + tail)
        hits = self.bm.match_prefix(o, len(o.tokens) - 1)
        self.bm.take_prefix(o, hits)
        o.computed = len(hits) * BS
        if self.bm.allocate(o, len(o.tokens)):
            o.computed = len(o.tokens)
            self.bm.cache_blocks(o, o.computed)
            self.owners.append(o)
        else:
            self.bm.free(o)

    @precondition(lambda self: self.owners)
    @rule(data=st.data(), n=st.integers(1, 9))
    def grow(self, data, n):
        o = data.draw(st.sampled_from(self.owners))
        if self.bm.allocate(o, len(o.tokens) + n):
            o.tokens = o.tokens + [7] * n
            o.computed = len(o.tokens)
            self.bm.cache_blocks(o, o.computed)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        o = data.draw(st.sampled_from(self.owners))
        self.owners.remove(o)
        self.bm.free(o)
        assert o.block_ids == []

    @rule()
    def reset(self):
        ok = self.bm.reset_prefix_cache()
        assert ok == (not self.owners or all(not o.block_ids for o in self.owners))

    @invariant()
    def counts_add_up(self):
        counts = self.bm.check_integrity()
        held = Counter(b for o in self.owners for b in o.block_ids)
        assert counts["used"] == len(held)
        assert all(self.bm.ref_counts[b] == n for b, n in held.items())

    @invariant()
    def shared_blocks_hold_the_same_tokens(self):
        seen: dict[int, tuple] = {}
        for o in self.owners:
            for i, b in enumerate(o.block_ids[: o.computed // BS]):
                content = tuple(o.tokens[i * BS:(i + 1) * BS])
                assert seen.setdefault(b, content) == content, "two requests share a block with different tokens"


TestBlockManager = BlockManagerMachine.TestCase
TestBlockManager.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_cached_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = Owner([1, 2, 3, 4]), Owner([5, 6, 7, 8])
    for o in (a, b):
        assert bm.allocate(o, 4)
        bm.cache_blocks(o, 4)
    bm.free(a)
    bm.free(b)
    c = Owner([9] * 12)
    assert bm.allocate(c, 12)  # two free blocks, then the oldest cached one (a's)
    assert bm.match_prefix(Owner([1, 2, 3, 4, 0]), 4) == []
    assert len(bm.match_prefix(Owner([5, 6, 7, 8, 0]), 4)) == 1
    events = bm.drain_events()
    assert len(events.stored) == 2 and len(events.removed) == 1
