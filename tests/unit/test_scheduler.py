"""The scheduler core with no model: fabricated step results through the step contract."""

from __future__ import annotations

from collections import deque

from xllm.config import CacheConfig, SchedulerConfig
from xllm.protocol import SamplingParams, TokenizedRequest
from xllm.scheduler.scheduler import Scheduler

from tests.unit.fake_worker import FakeWorker, next_token


def make(policy="fcfs", budget=64, seqs=16, blocks=64, bs=4, max_len=512, prefix=True, steps=1) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=budget, policy=policy,
                                     continuous_decode_steps=steps),
                     CacheConfig(block_size=bs, num_blocks=blocks, enable_prefix_caching=prefix), max_len)


def req(rid, prompt, max_tokens=8, t=0.0, priority=0, offline=False, eos=(), stop_ids=()) -> TokenizedRequest:
    tokens = prompt if isinstance(prompt, list) else [(hash(rid) + i) % 900 + 1 for i in range(prompt)]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=list(stop_ids))
    return TokenizedRequest(rid, tokens, sp, list(eos), t, priority, offline)


def expected(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def drive(s: Scheduler, worker: FakeWorker, depth: int = 1, max_steps: int = 1000):
    """Run to completion with ``depth`` steps in flight; returns (outputs, finish reasons, plans)."""
    outs, reasons, plans, flight = {}, {}, [], deque()
    for _ in range(max_steps):
        if not s.requests and not flight:
            break
        plan = s.schedule() if len(flight) < depth else None
        if plan is not None:
            plans.append(plan)
            flight.append(worker.execute(plan))
        if flight and (plan is None or len(flight) >= depth):
            out = s.update(flight.popleft())
            for rid, toks, why in zip(out.req_ids, out.new_token_ids, out.finish_reasons):
                outs.setdefault(rid, []).extend(toks)
                if why:
                    reasons[rid] = why
        s.blocks.check_integrity()
    assert not s.requests, "did not finish"
    return outs, reasons, plans


def test_chunked_prefill_honours_the_token_budget():
    s = make(budget=16)
    s.add_request(req("a", 50, max_tokens=3))
    outs, _, plans = drive(s, FakeWorker())
    assert [p.num_scheduled[0] for p in plans[:4]] == [16, 16, 16, 2]
    assert all(sum(p.num_scheduled) <= 16 for p in plans)
    assert len(outs["a"]) == 3


def test_the_mean_output_length_follows_finished_requests():
    """What the load report carries for the router's weight of a running request."""
    s = make()
    assert s.stats.output_tokens == 0.0
    s.add_request(req("a", 5, max_tokens=4))
    drive(s, FakeWorker())
    assert s.stats.output_tokens == 4.0
    s.add_request(req("b", 5, max_tokens=20))
    drive(s, FakeWorker())
    assert 4.0 < s.stats.output_tokens < 20.0  # a moving mean: the new length pulls it up


def test_decodes_and_a_new_prompt_share_a_step():
    s = make(budget=10)
    w = FakeWorker()
    for r in ("a", "b"):
        s.add_request(req(r, 3, max_tokens=20))
    s.update(w.execute(s.schedule()))  # both prompts (6 tokens)
    s.add_request(req("c", 30, max_tokens=2))
    plan = s.schedule()
    assert plan.scheduled_req_ids == ["a", "b", "c"] and plan.num_scheduled == [1, 1, 8]


def test_outputs_equal_with_async_depth_two_and_every_policy():
    prompts = {f"r{i}": [(i * 7 + j) % 50 + 1 for j in range(3 + 9 * i)] for i in range(6)}
    for policy in ("fcfs", "priority", "prefill_first", "decode_first"):
        for depth in (1, 2):
            s = make(policy=policy, budget=12)
            for i, (rid, p) in enumerate(prompts.items()):
                s.add_request(req(rid, p, max_tokens=5 + i, t=i, priority=-i))
            outs, reasons, _ = drive(s, FakeWorker(), depth=depth)
            for i, (rid, p) in enumerate(prompts.items()):
                assert outs[rid] == expected(p, 5 + i), (policy, depth, rid)
                assert reasons[rid] == "length"


def test_fcfs_admits_by_arrival_and_priority_by_priority():
    for policy, first in (("fcfs", "early"), ("priority", "urgent")):
        s = make(policy=policy, seqs=1)
        s.add_request(req("early", 4, t=1.0, priority=5))
        s.add_request(req("urgent", 4, t=2.0, priority=0))
        assert s.schedule().scheduled_req_ids == [first]


def test_prefill_first_and_decode_first_order_a_tight_step():
    def step_after_admission(policy):
        s = make(policy=policy, budget=8)
        w = FakeWorker()
        s.add_request(req("old", 4, max_tokens=10, t=0))
        s.update(w.execute(s.schedule()))
        s.add_request(req("long", 40, max_tokens=2, t=1))
        s.update(w.execute(s.schedule()))  # "long" gets its first chunk
        s.add_request(req("new", 20, max_tokens=2, t=2))
        return s.schedule()

    pf = step_after_admission("prefill_first")
    assert pf.scheduled_req_ids[0] == "new" and pf.num_scheduled[0] == 8
    df = step_after_admission("decode_first")
    assert df.scheduled_req_ids[:2] == ["old", "long"] and df.num_scheduled[:2] == [1, 7]


def test_offline_requests_use_only_spare_capacity_and_go_first_when_memory_is_short():
    s = make(seqs=2)
    s.add_request(req("off", 4, offline=True, t=0))
    s.add_request(req("on1", 4, t=1))
    s.add_request(req("on2", 4, t=2))
    assert s.schedule().scheduled_req_ids == ["on1", "on2"]  # offline waits for spare room
    s2 = make(blocks=12, bs=4, budget=64)
    w = FakeWorker()
    s2.add_request(req("off", 8, max_tokens=30, offline=True, t=0))
    s2.add_request(req("on", 8, max_tokens=30, t=1))
    outs, _, _ = drive(s2, w)
    assert s2.stats.num_preemptions > 0
    assert w.new_seen.count("off") > 1 and w.new_seen.count("on") == 1  # only the offline one was redone


def test_preemption_frees_blocks_and_resumes_with_every_token():
    s = make(blocks=8, bs=4, budget=64)
    w = FakeWorker()
    prompts = {r: [(ord(r) * 3 + j) % 90 + 1 for j in range(6)] for r in "abc"}
    for i, (rid, p) in enumerate(prompts.items()):
        s.add_request(req(rid, p, max_tokens=14, t=i))
    outs, _, plans = drive(s, w)
    assert s.stats.num_preemptions > 0
    assert any(p.finished_req_ids for p in plans)  # workers were told to drop the victims
    for rid, p in prompts.items():
        assert outs[rid] == expected(p, 14)
    assert s.blocks.check_integrity()["used"] == 0


def test_prefix_cache_hits_skip_computed_tokens():
    s = make(bs=4)
    w = FakeWorker()
    shared = list(range(1, 13))  # three full blocks
    s.add_request(req("a", shared + [50, 51], max_tokens=2))
    drive(s, w)
    s.add_request(req("b", shared + [60], max_tokens=2))
    plan = s.schedule()
    assert plan.num_computed == [12] and plan.num_scheduled == [1]
    s.add_request(req("c", shared, max_tokens=2))  # all cached: the last block is recomputed
    plan = s.schedule()
    i = plan.scheduled_req_ids.index("c")
    assert plan.num_computed[i] == 8 and plan.num_scheduled[i] == 4
    assert s.snapshot()["prefix_cache_hits"] == 20


def test_no_prefix_reuse_when_caching_is_off():
    s = make(prefix=False)
    w = FakeWorker()
    s.add_request(req("a", list(range(1, 13)), max_tokens=2))
    drive(s, w)
    s.add_request(req("b", list(range(1, 13)), max_tokens=2))
    assert s.schedule().num_computed == [0]


def test_end_conditions_and_abort():
    s = make()
    w = FakeWorker()
    p = [5, 6, 7]
    toks = expected(p, 6)
    s.add_request(req("eos", p, max_tokens=20, eos=[toks[2]]))
    s.add_request(req("stop", p, max_tokens=20, stop_ids=[toks[3]], t=1))
    s.add_request(req("len", p, max_tokens=2, t=2))
    s.add_request(req("gone", p, max_tokens=20, t=3))
    s.update(w.execute(s.schedule()))
    assert s.abort("gone") is not None and "gone" not in s.requests
    outs, reasons, _ = drive(s, w, depth=2)
    assert reasons == {"eos": "stop", "stop": "stop", "len": "length"}
    assert outs["eos"] == toks[1:3] and outs["len"] == toks[1:2]
    assert s.blocks.check_integrity()["used"] == 0


def test_requests_that_can_never_run_are_refused():
    s = make(blocks=4, bs=4, max_len=64)
    for bad in (req("long", 64), req("big", 10, max_tokens=40), req("empty", [])):
        try:
            s.add_request(bad)
        except ValueError as exc:
            assert str(exc)
        else:
            raise AssertionError(f"{bad.req_id} was accepted")


# -- multi-step decode (continuous decode steps) ----------------------------------------------


def test_multi_step_decode_gives_the_same_tokens_and_ends_where_single_steps_do():
    prompts = {f"r{i}": [(i * 5 + j) % 40 + 1 for j in range(2 + 5 * i)] for i in range(5)}
    toks = {rid: expected(p, 12) for rid, p in prompts.items()}
    ends = {"r0": dict(eos=[toks["r0"][4]]), "r1": dict(stop_ids=[toks["r1"][6]]), "r2": {}, "r3": {}, "r4": {}}
    for depth in (1, 2):
        for policy in ("fcfs", "decode_first"):
            results = []
            for steps in (1, 4):
                s = make(policy=policy, steps=steps, max_len=32)
                for i, (rid, p) in enumerate(prompts.items()):
                    s.add_request(req(rid, p, max_tokens=5 if rid == "r2" else 12, t=i, **ends[rid]))
                outs, reasons, plans = drive(s, FakeWorker(), depth=depth)
                assert s.blocks.check_integrity()["used"] == 0
                results.append((outs, reasons))
            assert results[0] == results[1], (depth, policy)
            outs, reasons = results[1]
            assert reasons["r0"] == "stop" and outs["r0"] == toks["r0"][:5]
            assert reasons["r1"] == "stop" and outs["r1"] == toks["r1"][:7]
            assert reasons["r2"] == "length" and outs["r2"] == toks["r2"][:5]
            assert outs["r4"] == toks["r4"][:10] and reasons["r4"] == "length"  # prompt 22 + 10 = the context


def test_a_multi_step_plan_is_all_decodes_within_max_tokens_and_the_context():
    s = make(steps=8, max_len=20, bs=4)
    w = FakeWorker()
    s.add_request(req("short", 4, max_tokens=3))
    s.add_request(req("long", 10, max_tokens=50, t=1))  # the context (20) ends it first
    plans = []
    while s.requests:
        plan = s.schedule()
        plans.append(plan)
        s.update(w.execute(plan))
    first, second = plans[0], plans[1]
    assert first.num_scheduled == [4, 10]  # prompts: one step each, no extension
    by_id = dict(zip(second.scheduled_req_ids, second.num_scheduled))
    assert by_id == {"short": 2, "long": 8}  # short: 3 outputs at most; long: 8 steps
    assert len(plans) == 3  # long: 1 + 8 + 1 tokens reach the context of 20
    assert s.stats.num_continued_steps == 7
    assert s.blocks.check_integrity()["used"] == 0


def test_no_multi_step_while_a_request_waits_or_a_prompt_runs():
    s = make(steps=4, seqs=1)
    w = FakeWorker()
    s.add_request(req("a", 4, max_tokens=20))
    s.update(w.execute(s.schedule()))
    s.add_request(req("b", 4, max_tokens=20, t=1))  # waits: one sequence at most
    assert s.schedule().num_scheduled == [1]
    s2 = make(steps=4)
    s2.add_request(req("a", 4, max_tokens=20))
    s2.update(w.execute(s2.schedule()))
    s2.add_request(req("b", 30, max_tokens=20, t=1))
    plan = s2.schedule()
    assert plan.num_scheduled == [1, 30]  # a prompt in the step: one decode step
    s2.update(w.execute(plan))
    assert s2.schedule().num_scheduled == [4, 4]


def test_multi_step_with_preemption_keeps_every_token():
    prompts = {r: [(ord(r) * 3 + j) % 90 + 1 for j in range(6)] for r in "abc"}
    for depth in (1, 2):
        s = make(blocks=9, bs=4, budget=64, steps=4)
        w = FakeWorker()
        for i, (rid, p) in enumerate(prompts.items()):
            s.add_request(req(rid, p, max_tokens=14, t=i))
        outs, _, plans = drive(s, w, depth=depth)
        assert s.stats.num_preemptions > 0
        assert any(n > 1 for p in plans[1:] for n in p.num_scheduled)
        for rid, p in prompts.items():
            assert outs[rid] == expected(p, 14)
        assert s.blocks.check_integrity()["used"] == 0


def test_steps_that_bring_fewer_tokens_than_planned_give_the_same_output():
    """Speculative decoding's contract: a step planned for n tokens may bring 1..n; the rest
    of its placeholders go and the next step (planned before, with async scheduling)
    starts from the request's true last token."""
    prompts = {r: [(ord(r) * 7 + j) % 80 + 1 for j in range(5 + 3 * i)] for i, r in enumerate("abcde")}
    accept = lambda rid, n: (n * 7 + ord(rid)) % 4  # 0..3 drafts accepted, by position
    for depth in (1, 2):
        for blocks in (64, 10):  # 10: preemption too
            s = make(steps=4, blocks=blocks, bs=4)
            for i, (rid, p) in enumerate(prompts.items()):
                s.add_request(req(rid, p, max_tokens=17, t=i))
            outs, reasons, plans = drive(s, FakeWorker(accept=accept), depth=depth)
            for rid, p in prompts.items():
                assert outs[rid] == expected(p, 17), (depth, blocks, rid)
                assert reasons[rid] == "length"
            assert s.blocks.check_integrity()["used"] == 0
            if blocks == 10:
                assert s.stats.num_preemptions > 0
