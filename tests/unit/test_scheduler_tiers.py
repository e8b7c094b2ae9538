"""The scheduler's side of the KV tiers with no model and no agent: fabricated step results
(``FakeWorker``) and fabricated agent answers (``KVTierDone``), through the orders it makes."""

from __future__ import annotations

from xllm.config import CacheConfig, SchedulerConfig
from xllm.protocol import BlockStored, KVTierDone, KVTierInventory, SamplingParams, TokenizedRequest
from xllm.scheduler.scheduler import Scheduler

from tests.unit.fake_worker import FakeWorker

BS = 4


def make(blocks=8, host=32, disk=0) -> Scheduler:
    cache = CacheConfig(block_size=BS, num_blocks=blocks, host_blocks=host, disk_blocks=disk,
                        disk_dir="/nonexistent/tiers" if disk else "")
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), cache, 256)


def req(rid, tokens, max_tokens=2):
    return TokenizedRequest(rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0), [], 0.0)


def prompt(seed, n):
    return [(seed * 31 + i * 7) % 500 + 1 for i in range(n)]


class Agent:
    """Collects the scheduler's orders and answers them when told to (a fabricated agent)."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.orders = []  # not answered yet
        self.log = []  # every order

    def take(self):
        new = self.s.take_tier_orders()
        self.orders += new
        self.log += new
        return new

    def answer(self, failed=()) -> None:
        for order in self.orders:
            self.s.tier_done(KVTierDone(order.job_id, [h for h in failed if any(
                op.block_hash == h and op.kind == "fetch" for op in order.ops)]))
        self.orders = []


def run(s: Scheduler, w: FakeWorker, agent: Agent, answer=True, failed=()):
    """Step until no request is left; returns every plan."""
    plans = []
    for _ in range(200):
        if not s.requests:
            break
        plan = s.schedule()
        agent.take()
        if plan is not None:
            plans.append(plan)
            s.update(w.execute(plan))
        if answer:
            agent.answer(failed)
        s.check_integrity()
    assert not s.requests
    return plans


def evict_from_device(s, w, agent, seed=100):
    """Fill the small device pool with other prompts until the cached blocks are gone."""
    for k in range(3):
        s.add_request(req(f"filler{seed + k}", prompt(seed + k, 24)))
        run(s, w, agent)


def returning_from_disk():
    """A scheduler whose host tier (4 blocks) let a's 4-block history go to disk, and ``b``,
    that history plus two tokens, just added: (scheduler, worker, agent)."""
    s, w = make(host=4, disk=64), FakeWorker()
    agent = Agent(s)
    history = prompt(1, 16)
    s.add_request(req("a", history))
    run(s, w, agent)
    evict_from_device(s, w, agent)
    s.add_request(req("b", history + [7, 8]))
    return s, w, agent


def test_a_cached_block_is_stored_down_and_held_until_the_agent_is_done():
    s, w = make(), FakeWorker()
    agent = Agent(s)
    s.add_request(req("a", prompt(1, 9)))  # two full blocks
    plan = s.schedule()
    (order,) = agent.take()
    assert order.step_id == plan.step_id and [op.kind for op in order.ops] == ["store", "store"]
    assert [op.device_block for op in order.ops] == plan.new_requests[0].block_ids[:2]
    s.update(w.execute(plan))
    run(s, w, agent, answer=False)  # the request ends; the agent has not answered
    counts = s.check_integrity()
    assert counts["used"] == 2 and counts["agent_held"] == 2  # held for the agent, not free
    agent.answer()
    assert s.check_integrity()["used"] == 0 and s.snapshot()["kv_host_blocks"] == 2


def test_a_prefix_evicted_from_the_device_comes_back_from_host_and_counts_as_computed():
    s, w = make(), FakeWorker()
    agent = Agent(s)
    history = prompt(1, 16)
    s.add_request(req("a", history))
    run(s, w, agent)
    evict_from_device(s, w, agent)
    assert s.blocks.match_prefix(Prefix(history), 15) == []  # nothing left on the device
    s.add_request(req("b", history + [7, 8]))
    plan = s.schedule()
    (order,) = agent.take()
    loads = [op for op in order.ops if op.kind == "load"]
    assert plan.loads_kv and len(loads) == 4 and order.ops[:4] == loads  # loads go first
    assert [op.device_block for op in loads] == plan.new_requests[0].block_ids[:4]
    assert plan.num_computed == [16] and plan.num_scheduled == [2]
    assert s.snapshot()["kv_host_loaded_blocks"] == 4
    s.update(w.execute(plan))
    s.abort("b")  # gone while the agent may still be writing its blocks: they stay held
    assert s.check_integrity()["agent_held"] == 4 and s.check_integrity()["used"] == 4
    agent.answer()
    assert s.check_integrity()["used"] == 0


def test_the_host_tier_spills_to_disk_and_a_disk_prefix_waits_for_its_fetch():
    s, w = make(host=4, disk=64), FakeWorker()
    agent = Agent(s)
    history = prompt(1, 16)
    s.add_request(req("a", history))
    run(s, w, agent)
    evict_from_device(s, w, agent)  # 18 more blocks through a host tier of 4: a's go to disk
    spilled = {op.block_hash for o in agent.log for op in o.ops if op.kind == "spill"}
    s.add_request(req("b", history + [7, 8]))
    assert "b" not in s.schedule().scheduled_req_ids  # b waits for its prefix to come up from disk
    (order,) = agent.take()
    fetches = [op for op in order.ops if op.kind == "fetch"]
    assert len(fetches) == 2 and {op.block_hash for op in fetches} <= spilled  # at most half the host tier
    assert not s.has_work()
    agent.answer()
    plan = s.schedule()
    assert plan.loads_kv and plan.num_computed == [8]  # the two fetched blocks load; the rest is computed
    assert s.snapshot()["kv_disk_fetched_blocks"] == 2


def test_a_fetched_prefix_stays_in_host_memory_until_its_request_loads_it():
    """Blocks written down while a request waits for its fetch (others run meanwhile) must not
    push the fetched blocks out of a small host tier: it would recompute what it fetched."""
    s, w, agent = returning_from_disk()
    assert "b" not in s.schedule().scheduled_req_ids
    fetched = {op.block_hash for o in agent.take() for op in o.ops if op.kind == "fetch"}
    assert len(fetched) == 2 and sorted(s.tiers.host.pins) == sorted(fetched)
    s.add_request(req("c", prompt(50, 13)))  # three new full blocks to write down: more than the room left
    while "c" in s.requests:
        plan = s.schedule()
        agent.take()
        s.update(w.execute(plan))
        s.check_integrity()
    assert all(h in s.tiers.host for h in fetched)
    agent.answer()
    plan = s.schedule()
    assert plan.loads_kv and plan.num_computed == [8]  # both fetched blocks load
    assert not s.tiers.host.pins  # loaded: they may go now
    s.update(w.execute(plan))
    run(s, w, agent)


def test_a_waiting_request_that_is_aborted_lets_its_blocks_go():
    s, w, agent = returning_from_disk()
    s.schedule()
    agent.take()
    assert s.tiers.host.pins
    s.abort("b")
    assert not s.tiers.host.pins
    agent.answer()
    s.check_integrity()


def test_a_request_matched_again_pins_each_block_once():
    s, w, agent = returning_from_disk()
    b = s.requests["b"]
    s.tiers._pin(b, [11, 12])
    s.tiers._pin(b, [12, 13])  # matched again on a later pass: 12 is already its pin
    assert b.tier_pins == [11, 12, 13] and s.tiers.host.pins == {11: 1, 12: 1, 13: 1}
    s.abort("b")
    assert not s.tiers.host.pins


def test_a_block_that_fails_its_fetch_is_recomputed_and_forgotten():
    s, w, agent = returning_from_disk()
    s.schedule()
    (order,) = agent.take()
    first, second = [op.block_hash for op in order.ops if op.kind == "fetch"]
    agent.answer(failed=[second])
    assert s.snapshot()["kv_disk_failed_blocks"] == 1
    assert second not in s.tiers.disk and second not in s.tiers.host and first in s.tiers.host
    plan = s.schedule()
    assert plan.num_computed == [4]  # the first block loads; the bad one and after are computed
    assert [op.kind for op in agent.take()[0].ops][:1] == ["load"]


def test_a_restarted_instance_adopts_its_disk_blocks():
    s, w = make(host=4, disk=64), FakeWorker()
    agent = Agent(s)
    history = prompt(1, 8)
    from xllm.block_hash import block_hashes

    hashes = block_hashes(history, BS)
    s.tier_inventory(KVTierInventory([BlockStored(hashes[0], 0, history[:4], 2),
                                      BlockStored(hashes[1], hashes[0], history[4:8], 2)]))
    assert s.snapshot()["kv_disk_blocks"] == 2
    s.add_request(req("b", history + [9]))
    assert s.schedule() is None  # nothing to run while its prefix comes up
    (order,) = agent.take()
    assert [op.block_hash for op in order.ops if op.kind == "fetch"] == hashes[:2]
    agent.answer()
    assert s.schedule().num_computed == [8]


def test_reset_forgets_every_tier_and_deletes_the_files():
    s, w = make(host=4, disk=64), FakeWorker()
    agent = Agent(s)
    s.add_request(req("a", prompt(1, 16)))
    run(s, w, agent)
    evict_from_device(s, w, agent)
    disk = set(s.tiers.disk.entries)
    assert disk and s.reset_prefix_cache()
    (order,) = agent.take()
    assert {op.block_hash for op in order.ops if op.kind == "drop"} == disk
    assert s.snapshot()["kv_host_blocks"] == 0 and s.snapshot()["kv_disk_blocks"] == 0


def test_without_tiers_nothing_is_ordered():
    s = Scheduler(SchedulerConfig(), CacheConfig(block_size=BS, num_blocks=8), 256)
    w, agent = FakeWorker(), Agent(s)
    s.add_request(req("a", prompt(1, 16)))
    plans = run(s, w, agent)
    assert agent.orders == [] and not any(p.loads_kv for p in plans)


# -- helpers -------------------------------------------------------------------------------------


class Prefix:
    """A ``BlockOwner`` to look a prefix up with."""

    def __init__(self, tokens):
        self.tokens, self.block_ids, self.block_hashes, self.num_cached_blocks = tokens, [], [], 0

    def known_token_ids(self):
        return self.tokens



def test_a_failed_fetch_forgets_only_the_disk_block_it_read():
    """A fetch whose file failed its checks is answered late; meanwhile the cache was reset
    and the same block went down to disk again, in a new file: that one stays known."""
    s, w, agent = returning_from_disk()
    s.schedule()
    (fetch,) = agent.take()
    first = next(op.block_hash for op in fetch.ops if op.kind == "fetch")
    agent.orders = []  # its answer comes late
    s.abort("b")
    run(s, w, agent)
    assert s.reset_prefix_cache()
    s.add_request(req("c", prompt(1, 16)))  # computes the prefix again (a's history)
    run(s, w, agent)
    evict_from_device(s, w, agent, seed=200)  # and it goes down to disk again
    assert first in s.tiers.disk
    s.tier_done(KVTierDone(fetch.job_id, [first]))  # the old file was bad
    assert first in s.tiers.disk  # the new file is another matter
