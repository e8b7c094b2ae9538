"""Migration on the real scheduler core: a decoding request leaves one instance after its
steps in flight land, its KV is pulled by the target, and it decodes on there with the
tokens it would have had; refusals, failed transfers and aborts on the way keep every
token and every block accounted for. The KV agents are played by hand (what each core
asks of its agent is answered as the agent would)."""

from __future__ import annotations

import msgspec
import pytest

from xllm.config import CacheConfig, SchedulerConfig
from xllm.protocol import (
    KVExpect, KVReceived, KVReleased, KVSendDone, MigrationTarget, RoleChange, SamplingParams, TokenizedRequest,
)
from xllm.scheduler.request import Status
from xllm.scheduler.roles import RoleSwitch
from xllm.scheduler.scheduler import Scheduler

from tests.unit.fake_worker import FakeWorker

B = MigrationTarget("b", "ipc://b")


def core(name: str) -> Scheduler:
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                  CacheConfig(block_size=4, num_blocks=64), 256)
    s.instance_id, s.address, s.agent_address = name, f"ipc://{name}", f"ipc://{name}-agent"
    return s


def tokenized(rid: str, n: int = 10, max_tokens: int = 16) -> TokenizedRequest:
    return TokenizedRequest(rid, list(range(3, 3 + n)), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                            [], 0.0, reply_to="ipc://frontend")


def step(s: Scheduler, worker: FakeWorker, tokens: dict[str, list[int]], plan=None) -> None:
    plan = plan or s.schedule()
    out = s.update(worker.execute(plan))
    for rid, toks in zip(out.req_ids, out.new_token_ids):
        tokens.setdefault(rid, []).extend(toks)


def run_until_idle(s: Scheduler, worker: FakeWorker, tokens: dict[str, list[int]]) -> None:
    for _ in range(200):
        plan = s.schedule()
        if plan is None:
            return
        step(s, worker, tokens, plan)


def reference(rid: str = "r1", **kw) -> list[int]:
    s, tokens = core("ref"), {}
    s.add_request(tokenized(rid, **kw))
    run_until_idle(s, FakeWorker(), tokens)
    return tokens[rid]


def start_and_leave(a: Scheduler, wa: FakeWorker, tokens: dict, outputs_before: int = 4):
    """Decode ``r1`` on ``a`` to ``outputs_before`` tokens, plan one more step (in flight,
    as with async scheduling), order the move, land the step: the hand-over message."""
    a.add_request(tokenized("r1"))
    while len(tokens.get("r1", [])) < outputs_before:
        step(a, wa, tokens)
    in_flight = a.schedule()
    assert a.start_migrating([B]) == 1
    assert a.requests["r1"].status is Status.MOVING and not a.running
    assert a.schedule() is None  # no new step for a request on its way out
    a.advance_migrations(0.0)
    assert a.take_handed() == []  # not while a step of it is in flight
    step(a, wa, tokens, in_flight)  # its token is streamed from here
    a.advance_migrations(0.0)
    [(address, msg)] = a.take_handed()
    assert address == B.address and a.take_moved() == {"r1": "b"}
    assert msg.output_token_ids == tokens["r1"] and msg.num_computed_tokens == 10 + len(tokens["r1"]) - 1
    assert msg.request.reply_to == "ipc://frontend" and msg.source_address == a.address
    return msg


def pull(a: Scheduler, b: Scheduler, msg) -> KVExpect:
    """The target admits the request; its agent forwards the pull to the source."""
    b.add_migrated(msg)
    assert b.schedule() is None  # blocks for its KV, nothing to compute until it is in
    [expect] = b.take_outbox().to_agent
    assert isinstance(expect, KVExpect) and expect.prefill.migration and expect.prefill_address == a.address
    a.add_prefill(expect.prefill)
    return expect


def test_a_moved_request_decodes_on_with_the_same_tokens_and_every_block_comes_back():
    a, b, wa, wb, tokens = core("a"), core("b"), FakeWorker(), FakeWorker(), {}
    msg = start_and_leave(a, wa, tokens)
    expect = pull(a, b, msg)
    out = a.take_outbox()
    [send] = out.moves
    n_blocks = -(-msg.num_computed_tokens // 4)
    assert send.src_blocks == a.requests["r1"].block_ids[:n_blocks] and send.dst_blocks == expect.block_ids[:n_blocks]
    assert send.dst_agent == b.agent_address and isinstance(out.to_agent[-1], KVSendDone)
    assert a.check_integrity()["used"] > 0  # held for the agent
    assert b.deliver(KVReceived("r1", True, -1)).rows == []  # no token to stream: the source streamed them
    run_until_idle(b, wb, tokens)
    assert tokens["r1"] == reference()
    a.kv_released(KVReleased("r1", True))
    assert a.requests == {} and a.check_integrity()["used"] == 0 and b.check_integrity()["used"] == 0
    assert "r1" not in a.finished_since_report  # it did not end: the router must not forget where it is
    assert a.migration_snapshot()["migrated_out"] == 1 and b.migration_snapshot()["migrated_in"] == 1


def test_a_failed_transfer_is_recomputed_at_the_target_with_the_same_tokens():
    a, b, wa, wb, tokens = core("a"), core("b"), FakeWorker(), FakeWorker(), {}
    msg = start_and_leave(a, wa, tokens)
    pull(a, b, msg)
    b.deliver(KVReceived("r1", False, error="cancelled"))
    run_until_idle(b, wb, tokens)
    assert tokens["r1"] == reference()
    a.kv_released(KVReleased("r1", False, "the decode side no longer expects it"))
    assert a.requests == {} and a.check_integrity()["used"] == 0
    assert b.migration_snapshot()["migration_failures"] == 1 and b.snapshot()["kv_recomputed"] == 1


def test_a_refused_request_stays_and_runs_on_at_the_source():
    a, wa, tokens = core("a"), FakeWorker(), {}
    start_and_leave(a, wa, tokens)
    a.stop_migrating()
    a.prefill_lost(["r1"], "the queue is full")  # the target's refusal
    assert a.requests["r1"].status is Status.RUNNING
    run_until_idle(a, wa, tokens)
    assert tokens["r1"] == reference() and a.check_integrity()["used"] == 0


def test_an_abort_after_the_hand_over_goes_to_the_target_and_the_source_lets_go():
    a, wa, tokens = core("a"), FakeWorker(), {}
    start_and_leave(a, wa, tokens)
    assert a.abort("r1") is None  # the target ends it (and streams the end)
    assert a.take_outbox().aborts == [(B.address, "r1")]
    assert a.requests == {} and a.check_integrity()["used"] == 0
    assert a.abort("r1") is None and a.take_outbox().aborts == [(B.address, "r1")]  # later ones too


def test_an_abort_while_the_target_pulls_waits_for_the_agent():
    a, b, wa, tokens = core("a"), core("b"), FakeWorker(), {}
    pull(a, b, start_and_leave(a, wa, tokens))
    a.take_outbox()
    assert a.abort("r1") is None and a.take_outbox().aborts == [(B.address, "r1")]
    assert a.check_integrity()["used"] > 0  # the agent may still read them
    a.kv_released(KVReleased("r1", False, "cancelled"))
    assert a.requests == {} and a.check_integrity()["used"] == 0


def test_a_request_ended_by_its_token_in_flight_does_not_move():
    a, wa, tokens = core("a"), FakeWorker(), {}
    a.add_request(tokenized("r1", max_tokens=3))
    while len(tokens.get("r1", [])) < 2:
        step(a, wa, tokens)
    in_flight = a.schedule()
    a.start_migrating([B])
    step(a, wa, tokens, in_flight)  # its last token
    a.advance_migrations(0.0)
    assert a.take_handed() == [] and a.requests == {} and tokens["r1"] == reference(max_tokens=3)
    assert "r1" in a.finished_since_report


def test_prompts_are_not_moved_until_they_decode_and_the_target_refuses_what_cannot_move():
    a, b, wa, tokens = core("a"), core("b"), FakeWorker(), {}
    a.add_request(tokenized("r1", n=40))
    a.start_migrating([B])
    assert not a.leaving  # still waiting: it moves once it decodes
    step(a, wa, tokens)
    a.advance_migrations(0.0)
    assert "r1" in a.leaving
    msg = a.take_handed()[0][1]
    bad = msgspec.structs.replace(msg, num_computed_tokens=msg.num_computed_tokens - 1)
    with pytest.raises(ValueError, match="only a decoding request"):
        b.add_migrated(bad)
    # past the context (it could never get its blocks, and would hold the queue's head)
    long = msgspec.structs.replace(msg, output_token_ids=[5] * 300, num_computed_tokens=40 + 300 - 1,
                                   request=msgspec.structs.replace(msg.request, sampling=SamplingParams(
                                       max_tokens=400, temperature=0.0)))
    with pytest.raises(ValueError, match="context"):
        b.add_migrated(long)
    assert b.requests == {}


def test_leaving_decode_with_targets_moves_the_streams_and_the_switch_stops_it():
    a, wa, tokens = core("a"), FakeWorker(), {}
    a.add_request(tokenized("r1"))
    step(a, wa, tokens)
    roles, order = RoleSwitch("decode"), RoleChange(1, "prefill", migrate_to=[B])
    assert roles.begin(order, now=0.0) == ""
    a.start_migrating(order.migrate_to)  # as the scheduler's actor does with the order
    a.advance_migrations(0.0)
    assert a.take_handed()[0][1].request.req_id == "r1"
    roles.release(a)
    assert a.migrate_targets == []


def test_a_hand_over_never_pulled_ends_the_request_everywhere_after_the_timeout():
    a, wa, tokens = core("a"), FakeWorker(), {}
    start_and_leave(a, wa, tokens)
    a.advance_migrations(a.kv_timeout_s - 1.0)
    assert "r1" in a.requests and a.take_expired() == []
    a.advance_migrations(a.kv_timeout_s + 1.0)
    [req] = a.take_expired()  # the actor streams its end ("abort")
    assert req.req_id == "r1" and a.take_outbox().aborts == [(B.address, "r1")]
    assert a.requests == {} and a.check_integrity()["used"] == 0
    assert a.abort("r1") is None and a.take_outbox().aborts == []  # nothing to forward any more
