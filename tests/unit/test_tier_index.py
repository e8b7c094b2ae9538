"""One KV tier's bookkeeping (host or disk): LRU eviction, token checks, pending entries,
and random sequences of its verbs that keep every slot owned once."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from xllm.scheduler.tier_index import TierIndex

T = (1, 2, 3, 4)


def test_the_least_recently_used_block_goes_first_and_its_slot_is_reused():
    tier = TierIndex("host", 2)
    a, _ = tier.put(10, 0, T)
    b, _ = tier.put(11, 10, T)
    tier.touch(10)  # 11 is now the least recently used
    c, evicted = tier.put(12, 11, T)
    assert evicted == (11, b) and c.slot == b.slot
    assert 11 not in tier and 10 in tier and 12 in tier
    again, evicted = tier.put(10, 0, T)  # already here: touched, nothing evicted
    assert again is a and evicted is None
    assert tier.check_integrity() == {"held": 2, "free": 0, "pending": 0}


def test_a_pinned_block_is_passed_over_and_a_tier_all_pinned_takes_nothing():
    tier = TierIndex("host", 2)
    tier.put(10, 0, T)
    tier.put(11, 10, T)
    tier.pin(10)  # the least recently used, but pinned: 11 goes instead
    _, evicted = tier.put(12, 11, T)
    assert evicted[0] == 11 and 10 in tier
    tier.pin(12)
    assert tier.put(13, 12, T) == (None, None) and 13 not in tier
    tier.unpin(12)
    _, evicted = tier.put(13, 12, T)
    assert evicted[0] == 12 and 10 in tier
    tier.pin(10)
    tier.unpin(10)  # pinned twice: still pinned once
    assert tier.put(14, 13, T)[1][0] == 13
    tier.unpin(10)
    assert tier.put(15, 14, T)[1][0] == 10
    assert tier.check_integrity()["held"] == 2


def test_a_hit_must_hold_the_same_tokens_and_be_ready():
    tier = TierIndex("disk", 4)
    tier.put(10, 0, T)
    assert tier.lookup(10, T) is not None
    assert tier.lookup(10, (1, 2, 3, 5)) is None  # a hash is not proof of the contents
    assert tier.lookup(99, T) is None
    entry, _ = tier.put(20, 0, T, ready=False)  # a fetch from disk not confirmed yet
    assert tier.lookup(20, T) is None and 20 in tier
    assert tier.mark_ready(20, entry) and tier.lookup(20, T) is entry


def test_a_confirmation_for_an_entry_that_was_replaced_changes_nothing():
    tier = TierIndex("host", 1)
    old, _ = tier.put(20, 0, T, ready=False)
    tier.put(21, 0, T)  # evicts the pending entry
    fresh, _ = tier.put(20, 0, T, ready=False)
    tier.remove(21)
    assert not tier.mark_ready(20, old) and not fresh.ready


def test_remove_and_clear_free_the_slots():
    tier = TierIndex("host", 3)
    for h in (1, 2, 3):
        tier.put(h, 0, T)
    assert tier.remove(2).slot == 1 and tier.remove(2) is None
    assert sorted(tier.clear()) == [1, 3]
    assert tier.check_integrity() == {"held": 0, "free": 3, "pending": 0}


class TierMachine(RuleBasedStateMachine):
    """Random puts, touches, removals and confirmations against a model of what is held."""

    def __init__(self) -> None:
        super().__init__()
        self.tier = TierIndex("t", 4)
        self.model: dict[int, object] = {}  # hash -> its entry, per the verbs' answers

    @rule(h=st.integers(0, 9), ready=st.booleans())
    def put(self, h, ready):
        entry, evicted = self.tier.put(h, 0, (h,), ready)
        if evicted is not None:
            assert evicted[0] != h and self.model.pop(evicted[0]) is evicted[1]
        self.model.setdefault(h, entry)
        assert self.model[h] is entry

    @rule(h=st.integers(0, 9))
    def touch(self, h):
        self.tier.touch(h)

    @rule(h=st.integers(0, 9))
    def remove(self, h):
        assert (self.tier.remove(h) is not None) == (self.model.pop(h, None) is not None)

    @rule(h=st.integers(0, 9))
    def confirm(self, h):
        entry = self.model.get(h)
        if entry is not None:
            assert self.tier.mark_ready(h, entry)
            assert self.tier.lookup(h, (h,)) is entry

    @invariant()
    def every_slot_is_owned_once(self):
        counts = self.tier.check_integrity()
        assert counts["held"] == len(self.model) and set(self.tier.entries) == set(self.model)


TestTierMachine = TierMachine.TestCase
