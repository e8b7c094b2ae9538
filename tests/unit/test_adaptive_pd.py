"""The adaptive PD controller on a scripted load with a fake clock: it flips when the split
is wrong, holds off while it is only briefly wrong, cools down, keeps one of each role,
and picks the instance with the least to drain."""

from __future__ import annotations

import pytest

from xllm.config import AdaptivePDConfig, SloConfig
from xllm.perf_model import ServiceModel
from xllm.protocol import InstanceLoad, InstanceProfile
from xllm.router.adaptive import RoleController
from xllm.router.registry import InstanceState, Registries

# prefill 10 ms + 1 ms per token; decode step 10 ms + 2 ms per request + 1 µs per context token
PROFILE = InstanceProfile((0.01, 1e-3, 0.0), (0.01, 2e-3, 1e-6))
SLO = SloConfig(ttft_s=1.0, tpot_s=0.05)
CFG = AdaptivePDConfig(enabled=True, window_s=10.0, hold_s=3.0, cooldown_s=10.0, margin=0.2, drain_timeout_s=30.0)
DECODE_HEAVY = (32, 512, 1.0)  # prompt tokens, output tokens, requests a second: one decode instance saturates
PROMPT_HEAVY = (400, 8, 4.0)  # one prefill instance saturates


def pools(**roles: int) -> Registries:
    reg = Registries()
    for role, n in roles.items():
        for k in range(n):
            inst = InstanceState(f"{role[0]}{k}", f"ipc://{role[0]}{k}", "x", role=role, num_blocks=4096,
                                 block_size=16, max_num_seqs=64)
            inst.model = ServiceModel(PROFILE)
            reg.add(inst)
    return reg


class Script:
    """Arrivals at a steady rate, the controller looked at every half second."""

    def __init__(self, ctl: RoleController, reg: Registries) -> None:
        self.ctl, self.reg, self.now, self.next_arrival = ctl, reg, 0.0, 0.0
        self.flips: list[tuple[float, str, str]] = []

    def run(self, seconds: float, load: tuple[int, int, float], finish_changes: bool = True) -> None:
        prompt, out, rate = load
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + 0.5, 6)
            while self.next_arrival <= self.now:
                self.ctl.observe(self.next_arrival, prompt, 0, out)
                self.next_arrival += 1.0 / rate
            for flip in self.ctl.step(self.reg, self.now):
                self.flips.append((self.now, flip.instance_id, flip.role))
                if finish_changes:  # it drains and switches at once
                    self.reg.set_role(flip.instance_id, flip.role)
                    self.ctl.finished(self.now, flip.instance_id)


def test_a_decode_heavy_load_turns_a_prefill_instance_into_a_decode_instance_after_the_hold():
    reg = pools(prefill=2, decode=1)
    script = Script(RoleController(SLO, CFG, 0.0), reg)
    script.run(20.0, DECODE_HEAVY)
    assert len(script.flips) == 1
    at, iid, role = script.flips[0]
    assert role == "decode" and iid.startswith("p") and at == 3.5  # wrong from 0.5 s, held 3 s
    assert len(reg.pool("prefill")) == 1 and len(reg.pool("decode")) == 2
    assert script.ctl.last["best_prefill"] == 1  # and it stays: 1 + 2 is the best split


def test_a_prompt_heavy_load_turns_a_decode_instance_into_a_prefill_instance():
    reg = pools(prefill=1, decode=2)
    script = Script(RoleController(SLO, CFG, 0.0), reg)
    script.run(20.0, PROMPT_HEAVY)
    assert [(iid[0], role) for _, iid, role in script.flips] == [("d", "prefill")]


def test_a_swing_shorter_than_the_hold_flips_nothing():
    reg = pools(prefill=2, decode=1)
    script = Script(RoleController(SLO, AdaptivePDConfig(enabled=True, window_s=1.0, hold_s=3.0), 0.0), reg)
    for _ in range(5):  # 2 s decode-heavy, 2 s quiet, again and again
        script.run(2.0, DECODE_HEAVY)
        script.run(2.0, (32, 8, 0.2))
    assert script.flips == []


def test_the_cooldown_spaces_changes_and_one_change_runs_at_a_time():
    reg = pools(prefill=3, decode=1)
    heavier = (32, 512, 1.5)  # two decode instances miss TPOT (83 ms); three meet it: two changes away
    ctl = RoleController(SLO, CFG, 0.0)
    script = Script(ctl, reg)
    script.run(8.0, heavier, finish_changes=False)
    assert len(script.flips) == 1  # the first change never finishes: no second one
    script.ctl.finished(script.now, script.flips[0][1])
    reg.set_role(script.flips[0][1], "decode")
    script.run(30.0, heavier)
    assert len(script.flips) == 2
    assert script.flips[1][0] - 8.0 >= CFG.cooldown_s
    assert len(reg.pool("prefill")) == 1 and len(reg.pool("decode")) == 3


def test_one_of_each_role_stays():
    reg = pools(prefill=1, decode=1)
    script = Script(RoleController(SLO, CFG, 0.0), reg)
    script.run(20.0, DECODE_HEAVY)  # decode is overloaded, but the last prefill instance stays
    assert script.flips == [] and script.ctl.last["best_prefill"] == 1


def test_a_split_that_meets_both_targets_is_left_alone():
    reg = pools(prefill=2, decode=1)
    script = Script(RoleController(SLO, CFG, 0.0), reg)
    script.run(20.0, (32, 64, 0.5))  # light: every split meets both targets
    assert script.flips == [] and script.ctl.last["score"] < 1.0


def test_measured_misses_trigger_what_the_predictions_alone_would_not():
    reg = pools(prefill=2, decode=1)
    load = (32, 512, 0.6)  # one decode instance: predicted TPOT 40 ms, within 50 ms
    quiet = Script(RoleController(SLO, CFG, 0.0), reg)
    quiet.run(20.0, load)
    assert quiet.flips == [] and quiet.ctl.last["score"] < 1.0
    reg.report(InstanceLoad("d0", "x", 0, 20, 3000, 4096, 0.2, 0.07))  # but it reports TPOT 70 ms
    quiet.run(10.0, load)
    assert [role for _, _, role in quiet.flips] == ["decode"]


def test_the_instance_with_the_least_to_drain_flips():
    reg = pools(prefill=3, decode=1)
    for iid, waiting in (("p0", 5), ("p1", 0), ("p2", 2)):
        reg.report(InstanceLoad(iid, "x", waiting, 1, 4000, 4096, 0.0, 0.0, num_waiting_blocks=10 * waiting))
    script = Script(RoleController(SLO, CFG, 0.0), reg)
    script.run(10.0, DECODE_HEAVY)
    assert script.flips[0][1:] == ("p1", "decode")


def test_a_change_with_no_answer_is_given_up():
    reg = pools(prefill=2, decode=1)
    ctl = RoleController(SLO, CFG, 0.0)
    Script(ctl, reg).run(5.0, DECODE_HEAVY, finish_changes=False)
    assert ctl.changing is not None and ctl.expired(5.0) == []
    assert ctl.expired(ctl.changing.started + CFG.drain_timeout_s + 10.5) == sorted(ctl.changing.pending)


def test_it_needs_both_targets():
    with pytest.raises(ValueError, match="needs both --slo-ttft-ms and --slo-tpot-ms"):
        RoleController(SloConfig(ttft_s=1.0), CFG, 0.0)


def test_a_large_deployment_moves_a_tenth_of_its_instances_per_change():
    reg = pools(prefill=60, decode=40)
    script = Script(RoleController(SLO, CFG, 0.0), reg)
    script.run(6.0, (32, 512, 60.0))  # 40 decode instances are far too few; about 94 would do
    assert len(script.flips) == 10 and {role for _, _, role in script.flips} == {"decode"}
    assert len({at for at, _, _ in script.flips}) == 1  # one change of ten instances

