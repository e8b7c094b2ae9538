"""The simulator's core (bench.sim): an instance keeps its profile's clock on scripted
traces, PD adds the transfer, a cached prefix is not computed again, and every request of
a trace ends exactly once whatever the policy, the split or the role changes."""

import pytest

from bench.sim.engine import SimConfig, Simulation
from bench.sim.traces import Chat, Phase, SimRequest, chat, phased
from xllm.config import AdaptivePDConfig, SloConfig
from xllm.protocol import InstanceProfile

# d2 = 0: a decode step does not depend on the context, so the expected times are exact
PROFILE = InstanceProfile(prefill=(0.05, 0.001, 1e-6), decode=(0.02, 0.002, 0.0))


def run(roles, reqs, policy="round_robin", **kw):
    sim = Simulation(SimConfig(tuple(roles), policy=policy, **kw), [PROFILE])
    return sim, sim.run(reqs)


def prefill_s(n: int, cached: int = 0) -> float:
    p0, p1, p2 = PROFILE.prefill
    return p0 + p1 * (n - cached) + p2 * (n * n - cached * cached)


def test_a_lone_request_takes_its_prefill_then_one_decode_step_a_token():
    _, res = run(["mixed"], [SimRequest(1.0, 300, 10, 0)])
    (job,) = res.jobs
    assert job.first_at - 1.0 == pytest.approx(prefill_s(300))
    d0, d1, _ = PROFILE.decode
    assert job.finish_at - job.first_at == pytest.approx(9 * (d0 + d1))  # 9 tokens after the first


def test_a_prompt_that_arrives_during_a_step_joins_the_next_beside_the_decode_rows():
    reqs = [SimRequest(0.0, 200, 5, 0), SimRequest(0.0, 100, 5, 1)]
    _, res = run(["mixed"], reqs)
    first, second = sorted(res.jobs, key=lambda j: j.seq)
    p0, p1, p2 = PROFILE.prefill
    d0, d1, _ = PROFILE.decode
    assert first.first_at == pytest.approx(prefill_s(200))  # the idle instance starts at once
    # one forward: the second prompt and the first request's decode row (p0 once)
    assert second.first_at == pytest.approx(first.first_at + max(p0, d0) + d1 + p1 * 100 + p2 * 100 ** 2)
    # the first gained a token in that step; then both decode as a batch of two
    assert first.finish_at == pytest.approx(second.first_at + 3 * (d0 + 2 * d1))
    assert second.finish_at == pytest.approx(first.finish_at + (d0 + d1))


def test_a_prompt_longer_than_the_budget_is_computed_in_chunks():
    _, res = run(["mixed"], [SimRequest(0.0, 300, 2, 0)], budget=128)
    p0, p1, p2 = PROFILE.prefill
    chunks = [(0, 128), (128, 256), (256, 300)]
    expected = sum(p0 + p1 * (b - a) + p2 * (b * b - a * a) for a, b in chunks)
    assert res.jobs[0].first_at == pytest.approx(expected)


def test_pd_adds_the_part_of_the_transfer_the_prefill_does_not_hide():
    cfg = dict(kv_bytes_per_token=1000, transfer_bytes_s=1e6, transfer_hidden=0.5, hop_s=0.01)
    sim, res = run(["prefill", "decode"], [SimRequest(0.0, 400, 3, 0)], **cfg)
    (job,) = res.jobs
    assert job.prefill_at.id == "i0" and job.decode_to.id == "i1"
    assert job.first_at == pytest.approx(prefill_s(400) + 0.5 * 400 * 1000 / 1e6 + 0.01)
    d0, d1, _ = PROFILE.decode
    assert job.finish_at - job.first_at == pytest.approx(2 * (d0 + d1))
    assert all(inst.used == 0 and inst.idle for inst in sim.instances.values())


def test_a_later_turn_finds_its_history_in_the_prefix_cache():
    first = SimRequest(0.0, 320, 16, 7)
    second = SimRequest(10.0, 320 + 16 + 64, 4, 7)  # the history and a new message
    _, res = run(["mixed"], [first, second], policy="prefix_cache_aware")
    later = next(j for j in res.jobs if j.req is second)
    assert later.cached == (320 + 16 - 1) // 16 * 16  # every full block of the history
    assert later.first_at - 10.0 == pytest.approx(prefill_s(second.prompt, later.cached))
    assert res.hit_tokens == later.cached


def _trace():
    phases = [Phase(20.0, 6.0, (64, 600), (2, 40)), Phase(20.0, 6.0, (16, 80), (60, 200))]
    return phased(phases, seed=3) + chat(Chat(20, turns=3, families=2, system=64, rate=2.0, think=2.0), 16, seed=4)


@pytest.mark.parametrize("policy", ["round_robin", "kv_cache_aware", "prefix_cache_aware", "slo_aware"])
@pytest.mark.parametrize("roles", [("mixed",) * 3, ("prefill", "decode", "decode")])
def test_every_request_ends_exactly_once_and_every_block_comes_back(policy, roles):
    reqs = sorted(_trace(), key=lambda r: r.arrival)
    sim, res = run(roles, reqs, policy=policy, num_blocks=96, max_num_seqs=8, budget=256,
                   slo=SloConfig(ttft_s=1.0, tpot_s=0.05))
    seqs = [j.seq for j in res.jobs]
    assert len(seqs) == len(set(seqs)) == len(reqs) and res.refused == 0
    for j in res.jobs:
        assert j.req.arrival <= j.first_at <= j.finish_at
    for inst in sim.instances.values():
        assert inst.used == 0 and inst.idle and inst.prefilling == 0 and inst.receiving == 0


def test_roles_change_under_adaptive_pd_and_no_request_is_lost():
    # prompt-heavy, then output-heavy: the controller moves instances between the pools
    phases = [Phase(60.0, 3.0, (500, 900), (2, 8)), Phase(60.0, 3.0, (16, 48), (150, 300))]
    reqs = phased(phases, seed=1)
    adaptive = AdaptivePDConfig(True, interval_s=1.0, window_s=5.0, hold_s=2.0, cooldown_s=5.0, drain_timeout_s=10.0)
    sim, res = run(("prefill", "decode", "decode", "decode"), reqs, policy="slo_aware", adaptive=adaptive,
                   slo=SloConfig(ttft_s=2.0, tpot_s=0.05))
    assert res.role_changes
    roles = [inst.role for inst in sim.instances.values()]
    assert "prefill" in roles and "decode" in roles  # one of each kept
    assert len({j.seq for j in res.jobs}) == len(res.jobs) == len(reqs)
    assert all(inst.used == 0 and inst.idle for inst in sim.instances.values())


def test_instances_sharing_cores_run_slower_while_more_are_busy_than_cores():
    reqs = [SimRequest(0.0, 300, 2, 0), SimRequest(0.0, 300, 2, 1)]
    _, alone = run(["mixed", "mixed"], reqs)
    _, shared = run(["mixed", "mixed"], reqs, cores=1)
    assert [j.first_at for j in alone.jobs] == pytest.approx([prefill_s(300)] * 2)
    assert [j.first_at for j in shared.jobs] == pytest.approx([2 * prefill_s(300)] * 2)
