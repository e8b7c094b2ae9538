"""The slo_aware policy on hand-built registries: for each case, the instance it must pick."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.block_hash import block_hashes
from xllm.config import SloConfig
from xllm.perf_model import ServiceModel
from xllm.protocol import InstanceLoad, InstanceProfile, SamplingParams, TokenizedRequest
from xllm.router.prefix_index import PrefixIndex
from xllm.router.registry import InstanceState, Registry
from xllm.router.slo import MAX_LOOKS, TOLERANCE, SloAware, SloRefused

BS = 16
# prefill 10 ms + 1 ms per token; decode step 10 ms + 2 ms per request + 1 µs per context token
PROFILE = InstanceProfile((0.01, 1e-3, 0.0), (0.01, 2e-3, 1e-6))
SLO = SloConfig(ttft_s=1.0, tpot_s=0.05)


def request(prompt: list[int], max_tokens: int = 64) -> TokenizedRequest:
    return TokenizedRequest("r", prompt, SamplingParams(max_tokens=max_tokens), [], 0.0,
                            block_hashes=block_hashes(prompt, BS), block_size=BS)


def instance(reg: Registry, iid: str, waiting: int = 0, waiting_blocks: int = 0, running: int = 0,
             free: int = 1000, profile: InstanceProfile = PROFILE, max_num_seqs: int = 64,
             prefilling: int = 0) -> InstanceState:
    inst = InstanceState(iid, f"ipc://{iid}", "x", num_blocks=1000, block_size=BS, max_num_seqs=max_num_seqs)
    inst.model = ServiceModel(profile)
    reg.add(inst)
    reg.report(InstanceLoad(iid, "x", waiting, running, free, 1000, 0.0, 0.0, num_waiting_blocks=waiting_blocks,
                            num_prefill_tokens=prefilling))
    return inst


PROMPT = list(range(100, 420))  # 320 tokens: 20 blocks, a 330 ms prefill alone


def test_the_least_prefill_backlog_wins_when_decode_is_idle():
    reg = Registry()
    instance(reg, "i0", waiting=2, waiting_blocks=30)  # 480 queued tokens: about half a second
    instance(reg, "i1", waiting=1, waiting_blocks=5)
    instance(reg, "i2", waiting=3, waiting_blocks=40)
    assert SloAware(PrefixIndex(), SLO).choose(request(PROMPT), reg).id == "i1"


def test_a_big_decode_batch_loses_to_a_small_one_when_prefill_is_idle():
    reg = Registry()
    instance(reg, "i0", running=16)  # step 10 + 32 ms + context: TPOT over 42 ms
    instance(reg, "i1", running=4)
    assert SloAware(PrefixIndex(), SLO).choose(request(PROMPT), reg).id == "i1"


def test_a_prompt_being_computed_counts_as_backlog():
    reg = Registry()
    instance(reg, "busy", running=1, prefilling=900)  # nothing waits, but 900 prompt tokens are left: 0.9 s
    instance(reg, "queued", waiting=1, waiting_blocks=20)  # 320 tokens queued: a third of a second
    assert SloAware(PrefixIndex(), SLO).choose(request(PROMPT), reg).id == "queued"


def test_with_the_same_target_binding_everywhere_the_other_decides():
    """Long prompts on idle instances: the TTFT binds alike on all of them (no backlog), so
    the decode batch picks: the smallest, wherever it is in the backlog order."""
    reg = Registry()
    for k, running in enumerate((12, 9, 2, 12)):
        instance(reg, f"i{k}", running=running)
    # 330 ms of prefill plus a decode step: TTFT slack 0.82-0.83 everywhere (within the 0.02 a
    # decision may leave on the table); TPOT slack 0.88 (i0) to 0.95 (i2)
    slo = SloConfig(ttft_s=2.0, tpot_s=0.3)
    assert SloAware(PrefixIndex(), slo).choose(request(PROMPT), reg).id == "i2"


def test_the_tighter_target_decides_between_prefill_backlog_and_decode_batch():
    reg = Registry()
    instance(reg, "fast-first-token", running=18)  # TPOT about 48 ms: 3% within 50 ms
    instance(reg, "fast-tokens", waiting=1, waiting_blocks=20, running=2)  # TTFT about 0.68 s: within 1 s
    assert SloAware(PrefixIndex(), SLO).choose(request(PROMPT), reg).id == "fast-tokens"


def test_a_cache_hit_outweighs_a_short_queue():
    reg, index = Registry(), PrefixIndex()
    instance(reg, "i0", waiting=1, waiting_blocks=6)  # about 100 ms queued
    instance(reg, "i1")
    index.stored("i0", block_hashes(PROMPT, BS)[:18])  # saves 288 of 320 tokens of prefill
    assert SloAware(index, SLO).choose(request(PROMPT), reg).id == "i0"


def test_a_faster_instance_wins_at_equal_load():
    reg = Registry()
    instance(reg, "slow", running=4)
    instance(reg, "fast", running=4, profile=InstanceProfile((0.005, 5e-4, 0.0), (0.005, 1e-3, 5e-7)))
    assert SloAware(PrefixIndex(), SLO).choose(request(PROMPT), reg).id == "fast"


def test_an_instance_without_room_counts_only_when_none_has_room():
    reg = Registry()
    instance(reg, "no-blocks", free=10)  # the request needs 24 blocks
    instance(reg, "no-slots", running=8, max_num_seqs=8)
    instance(reg, "room", waiting=2, waiting_blocks=30, running=6)
    policy = SloAware(PrefixIndex(), SLO)
    assert policy.choose(request(PROMPT), reg).id == "room"
    full = Registry()
    instance(full, "a", free=10)
    instance(full, "b", free=5)
    assert policy.choose(request(PROMPT), full).id in {"a", "b"}  # it waits somewhere


def test_a_pair_takes_the_prefill_side_by_ttft_and_the_decode_side_by_tpot():
    prefill, decode = Registry(), Registry()
    instance(prefill, "p0", waiting=4, waiting_blocks=60)
    instance(prefill, "p1", waiting=1, waiting_blocks=10, running=30)  # its decode batch does not matter
    instance(decode, "d0", waiting=1, waiting_blocks=80, running=12)  # its queued prompt's prefill does not matter
    instance(decode, "d1", running=14)
    pre, dec = SloAware(PrefixIndex(), SLO).choose_pair(request(PROMPT), prefill, decode)
    assert (pre.id, dec.id) == ("p1", "d0")


def test_when_every_instance_misses_it_is_refused_with_the_predictions_or_sent_where_it_misses_least():
    reg = Registry()
    instance(reg, "i0", waiting=10, waiting_blocks=100)  # about 1.7 s of prefill queued
    instance(reg, "i1", waiting=8, waiting_blocks=80)
    with pytest.raises(SloRefused, match=r"TTFT 1000 ms, TPOT 50 ms\): the best predicts TTFT 1\d{3} ms"):
        SloAware(PrefixIndex(), SloConfig(1.0, 0.05, reject=True)).choose(request(PROMPT), reg)
    assert SloAware(PrefixIndex(), SLO).choose(request(PROMPT), reg).id == "i1"


def test_no_instance_no_choice():
    assert SloAware(PrefixIndex(), SLO).choose(request(PROMPT), Registry()) is None
    with pytest.raises(ValueError, match="needs a TTFT and a TPOT target"):
        SloAware(PrefixIndex(), SloConfig(ttft_s=1.0))


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=1, max_value=MAX_LOOKS))
def test_the_walk_finds_what_looking_at_every_instance_finds(seed, n):
    """Stopping early misses no instance with a score more than TOLERANCE higher: the choice
    has the largest (room, score) of all, cache hits included, within that tolerance."""
    rng = random.Random(seed)
    reg, index = Registry(), PrefixIndex()
    prompt = [rng.randrange(3, 60) for _ in range(rng.choice([20, 160, 400]))]
    hashes = block_hashes(prompt, BS)
    for k in range(n):
        instance(reg, f"i{k}", waiting=(w := rng.randint(0, 4)), waiting_blocks=w * rng.randint(0, 20),
                 running=rng.randint(0, 40), free=rng.randint(0, 1000), prefilling=rng.choice([0, 0, 300, 2000]))
        if rng.random() < 0.2:
            index.stored(f"i{k}", hashes[:rng.randint(1, len(hashes))])
    policy = SloAware(index, SloConfig(ttft_s=rng.choice([0.3, 1.0]), tpot_s=rng.choice([0.03, 0.08])))
    req = request(prompt, rng.choice([16, 256]))
    chosen = policy.choose(req, reg)
    everyone = max(((p.fits, p.score) for p in (policy.predict(req, i) for i in reg.instances.values())))
    got = policy.predict(req, chosen)
    if everyone[0]:  # else none has room: it waits wherever it goes
        assert got.fits and got.score >= everyone[1] - TOLERANCE - 1e-12
