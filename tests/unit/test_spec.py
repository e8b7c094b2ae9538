"""Speculative decoding's parts without a model: the suffix proposer and the verification rule."""

from __future__ import annotations

import torch

from xllm.spec.suffix import SuffixProposer
from xllm.spec.verify import verify_greedy, verify_sampled


def test_suffix_proposes_what_followed_the_longest_match_scaled_by_its_length():
    p = SuffixProposer()
    p.add("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4], 9)
    assert p.draft("a", 8) == [5, 6, 7, 8]  # a 4-token match earns 4 tokens
    assert p.draft("a", 2) == [5, 6]
    p.extend("a", [5, 6])
    assert p.draft("a", 8)[:3] == [7, 8, 9]


def test_suffix_picks_the_most_frequent_continuation_and_respects_the_floor():
    p = SuffixProposer(min_prob=0.5)
    p.add("a", [7, 1, 7, 1, 7, 2, 7, 1, 9, 7], 10)  # after 7: 1 three times, 2 once
    assert p.draft("a", 1) == [1]
    q = SuffixProposer(min_prob=0.9)
    q.add("a", [7, 1, 7, 1, 7, 2, 7, 1, 9, 7], 10)
    assert q.draft("a", 1) == []  # 3/4 < 0.9


def test_shared_index_learns_from_finished_requests_only_within_its_window():
    p = SuffixProposer(global_requests=1)
    p.add("a", [1, 2], 2)
    p.extend("a", [50, 51, 52, 53])
    p.drop("a")
    p.add("b", [3, 50, 51], 3)
    assert p.draft("b", 2) == [52, 53]  # b's own tokens never saw 51 -> 52
    p.add("c", [8, 9], 2)
    p.extend("c", [60, 61])
    p.drop("c")  # pushes a's output out of the one-request window
    p.add("d", [50, 51], 2)
    assert p.draft("d", 2) == []


def test_ngram_needs_n_tokens_of_match():
    p = SuffixProposer.ngram(3)
    p.add("a", [1, 2, 3, 4, 5, 9, 1, 2, 3], 9)
    assert p.draft("a", 3) == [4, 5, 9]
    p.add("b", [4, 2, 3, 9, 8, 2, 3], 7)  # only a 2-token match
    assert p.draft("b", 3) == []


def test_greedy_keeps_the_agreeing_prefix_and_one_token_of_the_target():
    assert verify_greedy([5, 6, 7, 8], [5, 6, 1]) == [5, 6, 7]
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert verify_greedy([4, 6], [5]) == [4]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _first_tokens(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, n: int, seed: int) -> torch.Tensor:
    """Counts of the first token kept over ``n`` trials; with ``q``, each trial's drafts are
    drawn from q (as a draft model's are)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[1])
    for _ in range(n):
        if q is not None:
            drafts = [_sample(row, gen) for row in q]
        counts[verify_sampled(p, drafts, lambda j: gen, q)[0]] += 1
    return counts


def test_rejection_sampling_keeps_the_target_distribution():
    """The first token kept follows p_0 whatever the draft: for a certain draft and for
    drafts from another distribution q. Chi-square over 8 tokens (7 degrees of freedom):
    the 0.999 quantile is 24.3; a rule that keeps the draft when p(d) > q(d), or that
    samples the residual from p unchanged, is far beyond it at 20,000 samples."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 8) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(2, 8) * 1.5, dim=-1)
    n = 20_000
    for drafts, qq in (([int(p[0].argmin()), 3], None), ([int(p[0].argmax()), 1], None), ([], q)):
        counts = _first_tokens(p, drafts, qq, n, seed=1)
        assert _chi_square(counts, p[0]) < 24.3, (drafts, counts / n, p[0])
    # the same check catches a wrong rule: keep a certain draft with probability 1/2
    wrong = torch.zeros(8)
    gen = torch.Generator().manual_seed(2)
    for _ in range(n):
        wrong[2 if float(torch.rand((), generator=gen)) < 0.5 else _sample(p[0], gen)] += 1
    assert _chi_square(wrong, p[0]) > 24.3


def _sample(p: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(p, 1, generator=gen))


def test_a_kept_draft_is_followed_by_the_next_rows_distribution():
    """Given the first draft is kept, the second token follows p_1."""
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(2, 6), dim=-1)
    p[0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # the target is sure of the draft
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(6)
    for _ in range(10_000):
        out = verify_sampled(p, [2], lambda j: gen)
        assert out[0] == 2 and len(out) == 2
        counts[out[1]] += 1
    assert _chi_square(counts, p[1]) < 20.5  # 5 degrees of freedom, 0.999 quantile


def test_drafts_are_verified_only_where_they_raise_tokens_per_second():
    """With the instance's step times, a step keeps the drafts whose expected tokens pay for
    their rows: all of a request that keeps its drafts where rows are cheap (one stream: up
    to 8 rows cost about what one does), none of a request that keeps none, none that may
    fail where they would push the step into a dearer batch bucket or where every row costs
    as much as a step's fixed part; without a model, every draft."""
    from xllm.perf_model import ServiceModel
    from xllm.protocol import InstanceProfile
    from xllm.worker.graph_runner import DecodeGraphs
    from xllm.worker.speculative import Speculator, StepCost

    class Graphs:  # measured step times per bucket, as DecodeGraphs keeps them
        step_seconds = {1: 0.020, 2: 0.020, 4: 0.021, 8: 0.022, 16: 0.045}
        buckets = sorted(step_seconds)
        bucket_for = DecodeGraphs.bucket_for

    spec = Speculator(proposer=None)
    for _ in range(20):
        spec._observe("good", 4, 4)  # keeps every draft
        spec._observe("poor", 0, 4)  # keeps none
    law = ServiceModel(InstanceProfile((0.0, 0.0, 0.0), (0.002, 0.010, 1e-7)))
    drafts = {"good": [1, 2, 3, 4], "poor": [5, 6, 7, 8]}
    ctx = {"good": 100, "poor": 100}
    spec.set_cost(StepCost(law, Graphs()))
    cheap = spec.worth_verifying(drafts, rows=2, samplers=2, context=ctx)
    assert cheap == {"good": [1, 2, 3, 4], "poor": []}
    batch = {f"r{i}": [9, 9] for i in range(8)}  # 8 new requests (the mean's rate), at bucket 8
    assert all(not d for d in spec.worth_verifying(batch, rows=8, samplers=8,
                                                   context={r: 100 for r in batch}).values())
    spec.set_cost(StepCost(law))  # no graphs: the law, where a row costs 5x the fixed part
    dear = spec.worth_verifying(drafts | batch, rows=10, samplers=10, context=ctx | {r: 100 for r in batch})
    assert all(not d for rid, d in dear.items() if rid != "good") and spec.mean_rate < 0.9
    spec.set_cost(None)
    assert spec.worth_verifying(drafts, rows=2, samplers=2, context=ctx) == drafts


def test_a_request_whose_drafts_were_dropped_is_tried_again():
    """Dropped drafts are not observed, so a request's low estimate drifts back to the mean
    until its drafts are verified again (it is never shut out for good)."""
    from xllm.perf_model import ServiceModel
    from xllm.protocol import InstanceProfile
    from xllm.worker.speculative import Speculator, StepCost

    spec = Speculator(proposer=None)
    for _ in range(50):
        spec._observe("other", 3, 4)  # the mean: 3 of 4 kept
    for _ in range(5):
        spec._observe("r", 0, 4)  # misses in a row: a low estimate
    spec.set_cost(StepCost(ServiceModel(InstanceProfile((0.0, 0.0, 0.0), (0.020, 0.004, 4e-6)))))
    tries = [spec.worth_verifying({"r": [1, 2]}, rows=1, samplers=1, context={"r": 700})["r"] for _ in range(10)]
    assert not tries[0] and any(tries)


def test_the_proposer_is_not_asked_when_no_draft_could_pay():
    """At a batch where any draft pushes the step into a much dearer bucket, the proposer
    is not called at all (its time is the worker's); at one stream it is."""
    from xllm.perf_model import ServiceModel
    from xllm.protocol import InstanceProfile
    from xllm.worker.graph_runner import DecodeGraphs
    from xllm.worker.speculative import Speculator, StepCost

    class Graphs:
        step_seconds = {1: 0.022, 2: 0.026, 4: 0.031, 8: 0.037, 16: 0.097}
        buckets = sorted(step_seconds)
        bucket_for = DecodeGraphs.bucket_for

    spec = Speculator(proposer=None)
    spec.set_cost(StepCost(ServiceModel(InstanceProfile((0.0, 0.0, 0.0), (0.02, 0.004, 4e-6))), Graphs()))
    eight = {f"r{i}": 4 for i in range(8)}
    assert not spec.may_pay(eight, rows=8, samplers=8, context={r: 300 for r in eight})
    assert spec.may_pay({"r0": 4}, rows=1, samplers=1, context={"r0": 300})
    spec.set_cost(None)
    assert spec.may_pay(eight, rows=8, samplers=8, context={r: 300 for r in eight})


def test_estimates_too_low_to_verify_anything_are_checked_again_where_rows_are_cheap():
    """When the mean share kept has fallen so low that no draft seems worth a row, a request
    that has verified none for a while gets its first draft verified where a row is cheap
    (one stream), not where it pushes the step into a dearer bucket (batch 8)."""
    from xllm.perf_model import ServiceModel
    from xllm.protocol import InstanceProfile
    from xllm.worker.graph_runner import DecodeGraphs
    from xllm.worker.speculative import EXPLORE_AFTER, Speculator, StepCost

    class Graphs:
        step_seconds = {1: 0.022, 2: 0.026, 4: 0.031, 8: 0.037, 16: 0.097}
        buckets = sorted(step_seconds)
        bucket_for = DecodeGraphs.bucket_for

    spec = Speculator(proposer=None)
    spec.mean_rate = 0.05  # every request looks hopeless
    spec.set_cost(StepCost(ServiceModel(InstanceProfile((0.0, 0.0, 0.0), (0.02, 0.004, 4e-6))), Graphs()))
    assert not spec.may_pay({"a": 4}, rows=1, samplers=1, context={"a": 300})
    spec.idle["a"] = EXPLORE_AFTER
    assert spec.may_pay({"a": 4}, rows=1, samplers=1, context={"a": 300})
    assert spec.worth_verifying({"a": [1, 2, 3, 4]}, rows=1, samplers=1, context={"a": 300}) == {"a": [1]}
    eight = {f"r{i}": 4 for i in range(8)}
    spec.idle.update({r: EXPLORE_AFTER for r in eight})
    assert not spec.may_pay(eight, rows=8, samplers=8, context={r: 300 for r in eight})
