"""Role changes at run time: the instance's side (drain, then switch) on the real scheduler
core, and the router's pools while an instance drains."""

from __future__ import annotations

from xllm.config import CacheConfig, SchedulerConfig
from xllm.protocol import InstanceLoad, KVReleased, PrefillRequest, RoleChange, SamplingParams, TokenizedRequest
from xllm.router.registry import InstanceState, Registries, placement
from xllm.scheduler.roles import RoleSwitch
from xllm.scheduler.scheduler import Scheduler

from tests.unit.fake_worker import FakeWorker


def core() -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                     CacheConfig(block_size=4, num_blocks=64), 256)


def tokenized(rid: str, n: int = 10, max_tokens: int = 3) -> TokenizedRequest:
    return TokenizedRequest(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                            [], 0.0, reply_to="ipc://frontend")


def run_until_idle(s: Scheduler, worker: FakeWorker) -> None:
    for _ in range(100):
        plan = s.schedule()
        if plan is None:
            return
        s.update(worker.execute(plan))


def test_leaving_prefill_waits_for_the_prefills_held_for_others():
    s, worker, roles = core(), FakeWorker(), RoleSwitch("prefill")
    s.add_prefill(PrefillRequest(tokenized("p1"), "d0", "ipc://d0", "ipc://d0-agent", list(range(3))))
    assert roles.begin(RoleChange(1, "decode", drain_timeout_s=30.0), now=0.0) == ""
    assert roles.next_role == "decode" and roles.role == "prefill"
    assert not roles.due(s.requests.values(), now=1.0)
    run_until_idle(s, worker)  # prefilled: its blocks are held until the agent lets go
    assert not roles.due(s.requests.values(), now=2.0)
    s.kv_released(KVReleased("p1", True))
    assert roles.due(s.requests.values(), now=3.0)
    done = roles.finish("i0", "inc", s.requests.values(), now=3.5)
    assert (done.role, done.ok, done.change_id, done.left_over, done.drain_s) == ("decode", True, 1, 0, 3.5)
    assert roles.role == "decode" and roles.next_role == "" and roles.num_changes == 1


def test_leaving_decode_waits_for_its_streams_and_ignores_prefills_for_others():
    s, worker, roles = core(), FakeWorker(), RoleSwitch("decode")
    s.add_request(tokenized("d1"))
    s.add_prefill(PrefillRequest(tokenized("p1"), "d9", "ipc://d9", "ipc://d9-agent", list(range(3))))
    roles.begin(RoleChange(2, "prefill"), now=0.0)
    assert roles.old_work(s.requests.values()) == 1  # the stream, not the prefill for another instance
    run_until_idle(s, worker)
    assert roles.due(s.requests.values(), now=1.0)  # d1 finished; p1 is work of the new role
    assert roles.finish("i0", "inc", s.requests.values(), now=1.0).role == "prefill"


def test_the_drain_timeout_switches_with_what_is_left():
    s, roles = core(), RoleSwitch("decode")
    s.add_request(tokenized("d1"))
    roles.begin(RoleChange(3, "prefill", drain_timeout_s=5.0), now=0.0)
    assert not roles.due(s.requests.values(), now=4.9)
    assert roles.due(s.requests.values(), now=5.0)
    done = roles.finish("i0", "inc", s.requests.values(), now=5.0)
    assert (done.role, done.left_over) == ("prefill", 1)


def test_an_order_for_the_role_it_has_is_done_at_once_and_not_counted():
    roles = RoleSwitch("decode")
    roles.begin(RoleChange(4, "decode"), now=0.0)
    assert roles.due([], now=0.0)
    assert roles.finish("i0", "inc", [], now=0.0).role == "decode" and roles.num_changes == 0


def test_refused_orders_leave_the_role_alone():
    assert "no KV agent" in RoleSwitch("mixed").begin(RoleChange(5, "decode"))
    roles = RoleSwitch("prefill")
    assert "not 'mixed'" in roles.begin(RoleChange(6, "mixed"))
    assert "drain timeout" in roles.begin(RoleChange(7, "decode", drain_timeout_s=-1.0))
    assert roles.pending is None and roles.role == "prefill"


def _pools() -> Registries:
    pools = Registries()
    for iid, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
        pools.add(InstanceState(iid, f"ipc://{iid}", "inc", role=role))
    return pools


def test_a_draining_instance_takes_no_new_work_and_keeps_its_load_view():
    pools = _pools()
    pools.report(InstanceLoad("p1", "inc", 2, 1, 50, 64, 0.0, 0.0))
    pools.set_role("p1", "prefill", "decode")
    assert len(pools.pool("prefill")) == 1 and len(pools.pool("decode")) == 1 and len(pools) == 3
    assert placement(pools, 100) == "pair"  # p0 and d0 still form a pair
    assert pools.get("p1").load.num_waiting == 2  # reports still land while it drains
    pools.report(InstanceLoad("p1", "inc", 0, 0, 64, 64, 0.0, 0.0))
    pools.set_role("p1", "decode")  # switched
    assert len(pools.pool("decode")) == 2 and len(pools.pool("draining")) == 0
    assert pools.get("p1").load.num_free_blocks == 64
    pools.routed(pools.get("p1"), 3)  # routed in its new pool
    assert pools.get("p1").pending_blocks == 3


def test_a_decode_instance_leaving_decode_is_told_to_move_its_streams_to_the_other_decoders():
    import asyncio

    from xllm.config import RouterConfig
    from xllm.protocol import MigrationTarget
    from xllm.router.role_changes import RoleChanges

    pools = _pools()
    pools.add(InstanceState("d1", "ipc://d1", "inc", role="decode"))
    sent = []

    async def send(iid, msg):
        sent.append((iid, msg))

    changes = RoleChanges(pools, RouterConfig(), send, 0.0, control=False)
    asyncio.run(changes.order("d0", "prefill"))
    asyncio.run(changes.order("p0", "decode"))
    (to_d0, leaving_decode), (to_p0, leaving_prefill) = sent
    assert (to_d0, leaving_decode.role) == ("d0", "prefill")
    assert leaving_decode.migrate_to == [MigrationTarget("d1", "ipc://d1")]  # not itself
    assert (to_p0, leaving_prefill.migrate_to) == ("p0", [])  # prefills finish where they are
