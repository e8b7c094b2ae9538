"""The router's policies and prefix index on hand-built registries."""

from __future__ import annotations

from xllm.block_hash import block_hashes
from xllm.protocol import InstanceLoad, SamplingParams, TokenizedRequest
from xllm.router.policies import KVCacheAware, PrefixCacheAware, RoundRobin
from xllm.router.prefix_index import PrefixIndex
from xllm.router.registry import InstanceState, Registries, Registry, placement

BS = 4


def request(tokens: list[int]) -> TokenizedRequest:
    return TokenizedRequest("r", tokens, SamplingParams(max_tokens=4), [], 0.0,
                            block_hashes=block_hashes(tokens, BS), block_size=BS)


def registry(*loads: tuple[int, int]) -> Registry:
    """Instances i0, i1, ... with (running requests, free blocks) each."""
    reg = Registry()
    for n, (running, free) in enumerate(loads):
        reg.add(InstanceState(f"i{n}", f"ipc://i{n}", "x", num_blocks=100, block_size=BS, max_num_seqs=16))
        reg.report(InstanceLoad(f"i{n}", "x", 0, running, free, 100, 0.0, 0.0))
    return reg


def test_round_robin_takes_turns():
    reg = registry((0, 100), (0, 100), (0, 100))
    rr = RoundRobin()
    picks = [rr.choose(request([1]), reg).id for _ in range(6)]
    assert picks == ["i0", "i1", "i2", "i0", "i1", "i2"]


def test_kv_cache_aware_takes_the_most_free_memory_and_counts_what_it_just_sent():
    reg = registry((0, 40), (0, 90), (0, 60))
    policy = KVCacheAware()
    first = policy.choose(request([1]), reg)
    assert first.id == "i1"
    for _ in range(10):  # 10 just-sent prompts of 4 blocks: i2 now has the most
        reg.routed(first, 4)
    assert policy.choose(request([1]), reg).id == "i2"


def test_prefix_cache_aware_follows_the_longest_prefix():
    reg = registry((0, 100), (0, 100), (0, 100))
    index = PrefixIndex()
    prompt = list(range(40))  # 10 blocks
    hashes = block_hashes(prompt, BS)
    index.stored("i1", hashes[:3])
    index.stored("i2", hashes[:8])
    policy = PrefixCacheAware(index)
    assert policy.choose(request(prompt), reg).id == "i2"
    assert policy.choose(request(list(range(100, 140))), reg).id in {"i0", "i1", "i2"}  # no hit anywhere


def test_prefix_cache_aware_leaves_a_hot_instance_once_its_work_outweighs_the_hit():
    index = PrefixIndex()
    prompt = list(range(40))  # 10 blocks, all cached on i0
    index.stored("i0", block_hashes(prompt, BS))
    policy = PrefixCacheAware(index)
    # 9 requests running on i0: less work than the 10 blocks of prefill it saves, so stay
    assert policy.choose(request(prompt), registry((9, 100), (0, 100))).id == "i0"
    # 11 there: the idle instance is cheaper despite the prefill
    assert policy.choose(request(prompt), registry((11, 100), (0, 100))).id == "i1"


def test_a_running_request_weighs_what_its_decoding_costs_once_the_profile_is_known():
    """With a profile and a reported mean output, a running request counts as the decode
    time it adds over the rest of its output in blocks of prefill time, so a holder of the
    prompt busy decoding loses it to an idle instance sooner than one block per request would."""
    from xllm.perf_model import ServiceModel
    from xllm.protocol import InstanceProfile

    # a block (4 tokens) of prefill: 4 ms; a decode row: 2 ms a step; mean output 40 (20 left)
    model = ServiceModel(InstanceProfile((0.0, 1e-3, 0.0), (0.01, 2e-3, 0.0)))
    index = PrefixIndex()
    prompt = list(range(40))  # 10 blocks, all cached on i0
    index.stored("i0", block_hashes(prompt, BS))

    def reg(running: int, mean_output: float) -> Registry:
        r = Registry()
        for n, busy in enumerate((running, 0)):
            r.add(InstanceState(f"i{n}", f"ipc://i{n}", "x", num_blocks=100, block_size=BS, model=model))
            r.report(InstanceLoad(f"i{n}", "x", 0, busy, 100, 100, 0.0, 0.0, mean_output_tokens=mean_output))
        return r

    assert reg(3, 40.0).get("i0").running_weight == 2e-3 * 20 / 4e-3  # 10 blocks each
    assert reg(3, 0.0).get("i0").running_weight == 1.0  # no output seen yet: one block
    for bad in (float("nan"), float("inf"), -5.0):  # a broken report does not upset the load order
        assert reg(3, bad).get("i0").running_weight == 1.0
    policy = PrefixCacheAware(index)
    assert policy.choose(request(prompt), reg(3, 0.0)).id == "i0"  # 3 blocks of work < 10 saved
    assert policy.choose(request(prompt), reg(3, 40.0)).id == "i1"  # 30 blocks of decoding > 10 saved
    assert policy.choose(request(prompt), reg(0, 40.0)).id == "i0"


def test_prefix_cache_aware_spreads_a_burst_of_one_conversation_family():
    """Requests that all hit i0's cache go elsewhere once what was sent there outweighs the
    hit, before any new load report: the just-sent prompts count."""
    index = PrefixIndex()
    prompt = list(range(40))
    index.stored("i0", block_hashes(prompt, BS))
    reg, policy = registry((0, 100), (0, 100)), PrefixCacheAware(index)
    picks = []
    for _ in range(14):
        inst = policy.choose(request(prompt), reg)
        reg.routed(inst, 0 if inst.id == "i0" else 10)  # the prefill each brings there
        picks.append(inst.id)
    assert picks[:10] == ["i0"] * 10 and "i1" in picks


def test_prefix_cache_aware_prefers_less_load_at_equal_hits():
    index = PrefixIndex()
    prompt = list(range(16))
    index.stored("i0", block_hashes(prompt, BS))
    index.stored("i1", block_hashes(prompt, BS))
    assert PrefixCacheAware(index).choose(request(prompt), registry((5, 100), (2, 100))).id == "i1"


def test_prefix_index_forgets_removed_blocks_and_gone_instances():
    index = PrefixIndex()
    hashes = block_hashes(list(range(16)), BS)
    index.stored("i0", hashes)
    index.stored("i1", hashes[:2])
    assert (index.deepest("i0", hashes), index.deepest("i1", hashes)) == (4, 2)
    index.removed("i0", hashes[2:])  # its tail was evicted
    assert index.deepest("i0", hashes) == 2 and index.holders[hashes[1]] == {"i0", "i1"}
    index.clear("i1")
    assert index.deepest("i1", hashes) == 0 and index.holders[hashes[1]] == {"i0"}
    assert index.deepest("i0", block_hashes(list(range(50, 66)), BS)) == 0
    index.clear("i0")
    assert len(index) == 0


def test_least_loaded_survives_many_updates():
    reg = registry(*[(n % 7, 100) for n in range(50)])
    for _ in range(500):
        reg.routed(reg.least_loaded())
    loads = [i.work for i in reg.instances.values()]
    assert max(loads) - min(loads) <= 1  # always the least loaded: they level out


def _pools(**counts: int) -> Registries:
    pools = Registries()
    for role, n in counts.items():
        for k in range(n):
            pools.add(InstanceState(f"{role}{k}", f"ipc://{role}{k}", role=role))
    return pools


def test_pd_placement_splits_over_a_pair_and_falls_back_without_one():
    assert placement(_pools(prefill=1, decode=1), 500) == "pair"
    assert placement(_pools(prefill=1, decode=1, mixed=1), 500, short_prompt=64) == "pair"
    assert placement(_pools(prefill=1, decode=1, mixed=1), 64, short_prompt=64) == "mixed"  # short: mixed
    assert placement(_pools(prefill=1, decode=1), 64, short_prompt=64) == "decode"  # decode computes it
    assert placement(_pools(prefill=1, decode=1), 65, short_prompt=64) == "pair"
    assert placement(_pools(decode=1), 500) == "decode"  # the prefill side is gone: decode computes it
    assert placement(_pools(prefill=1), 500) == "prefill"
    assert placement(_pools(mixed=2), 500) == "mixed"


def test_each_role_is_its_own_pool_and_an_instance_can_change_role():
    pools = _pools(prefill=2, decode=1)
    assert len(pools) == 3 and len(pools.pool("prefill")) == 2
    pools.add(InstanceState("prefill0", "ipc://prefill0", role="decode"))  # re-registered as decode
    assert len(pools.pool("prefill")) == 1 and len(pools.pool("decode")) == 2 and len(pools) == 3
    assert pools.get("prefill0").role == "decode"
    assert pools.remove("decode0") is not None and len(pools) == 2 and pools.get("decode0") is None


# -- KV tiers: the index keeps each block's tiers; the policy prices each tier ------------------

DEVICE, HOST, DISK = 0, 1, 2
WEIGHTS = (0.0, 0.05, 0.15)  # device, host, disk (not the defaults: round numbers): a held block's cost in blocks of prefill


def test_the_index_keeps_every_tier_a_block_is_in():
    index = PrefixIndex()
    hashes = block_hashes(list(range(16)), BS)
    index.stored("i0", hashes, DEVICE)
    index.stored("i0", hashes, HOST)  # written through to host memory
    index.removed("i0", hashes[2:], DEVICE)  # evicted from the device: still in host memory
    assert index.deepest("i0", hashes) == 4 and index.holders[hashes[3]] == {"i0"}
    assert index.prefill_cost("i0", hashes, WEIGHTS) == 2 * 0.05  # two device blocks, two from host
    index.removed("i0", hashes[3:], HOST)
    index.stored("i0", hashes[3:], DISK)  # spilled to disk
    assert index.prefill_cost("i0", hashes, WEIGHTS) == 0.05 + 0.15
    index.removed("i0", hashes[3:], DISK)
    assert index.deepest("i0", hashes) == 3 and hashes[3] not in index.holders
    assert index.prefill_cost("i0", hashes, WEIGHTS) == 0.05 + 1  # the last block is computed


def test_a_device_hit_beats_a_host_hit_beats_a_disk_hit_beats_recomputing():
    prompt = list(range(40))  # 10 blocks
    hashes = block_hashes(prompt, BS)
    index = PrefixIndex()
    index.stored("i1", hashes, DISK)
    index.stored("i2", hashes, HOST)
    index.stored("i3", hashes, DEVICE)
    policy = PrefixCacheAware(index, tier_weights=WEIGHTS)
    assert policy.choose(request(prompt), registry((0, 100), (0, 100), (0, 100), (0, 100))).id == "i3"
    index.clear("i3")
    assert policy.choose(request(prompt), registry((0, 100), (0, 100), (0, 100), (0, 100))).id == "i2"
    index.clear("i2")
    assert policy.choose(request(prompt), registry((0, 100), (0, 100), (0, 100), (0, 100))).id == "i1"
    # a host hit is worth its load-back only: a little more work tips it to the device hit
    index.stored("i2", hashes, HOST)
    index.stored("i3", hashes[:9], DEVICE)  # one block short
    assert policy.choose(request(prompt), registry((0, 100), (0, 100), (0, 100), (0, 100))).id == "i2"
    assert policy.choose(request(prompt), registry((0, 100), (0, 100), (2, 100), (0, 100))).id == "i3"


def test_the_device_only_view_counts_lower_tiers_as_misses():
    prompt = list(range(40))
    hashes = block_hashes(prompt, BS)
    index = PrefixIndex()
    index.stored("i0", hashes, HOST)
    index.stored("i1", hashes[:3], DEVICE)
    device_only = PrefixCacheAware(index, tier_weights=(0.0, 1.0, 1.0))
    aware = PrefixCacheAware(index, tier_weights=WEIGHTS)
    reg = registry((1, 100), (1, 100))
    assert aware.choose(request(prompt), reg).id == "i0"
    assert device_only.choose(request(prompt), reg).id == "i1"
