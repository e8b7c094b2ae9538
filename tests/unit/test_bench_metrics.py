"""The benchmark metric math on hand-made timelines (no timing is measured here)."""

from __future__ import annotations

import math

import pytest

from bench.common import (RequestRecord, meets_slos, offline_requests, parse_slos, poisson_offsets,
                          shared_prefix_requests, stats, summarize)


def timeline(start: float, times: list[float], tokens: list[int] | None = None) -> RequestRecord:
    rec = RequestRecord(prompt_len=10, start=start)
    for t, n in zip(times, tokens or [1] * len(times)):
        rec.add(t, n)
    return rec


def test_ttft_tpot_e2el_of_one_request():
    rec = timeline(1.0, [1.5, 1.6, 1.8, 2.1])  # 4 tokens
    assert rec.ttft == pytest.approx(0.5)
    assert rec.e2el == pytest.approx(1.1)
    assert rec.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert rec.itls == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_counts_tokens_not_chunks():
    rec = timeline(0.0, [1.0, 2.0, 3.0], tokens=[1, 3, 1])  # 5 tokens in 3 chunks
    assert rec.output_tokens == 5
    assert rec.tpot == pytest.approx((3.0 - 1.0) / 4)
    assert rec.itls == pytest.approx([1.0, 1.0])


def test_single_token_has_no_tpot_and_failed_request_is_not_ok():
    assert timeline(0.0, [0.3]).tpot is None
    assert not RequestRecord(5, 0.0).ok
    failed = timeline(0.0, [0.1])
    failed.error = "boom"
    assert not failed.ok


def test_itl_is_pooled_over_requests():
    a = timeline(0.0, [1.0, 2.0, 4.0])  # gaps 1, 2
    b = timeline(0.0, [0.5, 0.6])  # gap 0.1
    s = summarize([a, b], duration=4.0)
    assert s["itl"]["mean"] == pytest.approx((1 + 2 + 0.1) / 3)
    assert s["itl"]["median"] == pytest.approx(1.0)
    # TPOT is per request, then averaged: a (4 - 1) / 2 = 1.5, b 0.1
    assert s["tpot"]["mean"] == pytest.approx((1.5 + 0.1) / 2)


def test_percentiles_interpolate_linearly():
    s = stats([float(x) for x in range(1, 101)])  # 1..100
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)
    assert all(math.isnan(v) for v in stats([]).values())


def test_throughput_counts_completed_requests_only():
    ok = timeline(0.0, [0.5, 1.0])
    bad = timeline(0.0, [0.5])
    bad.error = "cut off"
    s = summarize([ok, bad], duration=2.0)
    assert (s["completed"], s["failed"]) == (1, 1)
    assert s["output_tokens"] == 2
    assert s["output_throughput"] == pytest.approx(1.0)
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["input_tokens"] == 10


def test_parse_slos():
    assert parse_slos("ttft:2000,tpot:100") == {"ttft": 2.0, "tpot": 0.1}
    assert parse_slos("e2el:500") == {"e2el": 0.5}
    with pytest.raises(ValueError, match="itl"):
        parse_slos("itl:10")
    with pytest.raises(ValueError):
        parse_slos("ttft")


def test_goodput_needs_every_slo():
    slos = parse_slos("ttft:1000,tpot:100")
    fast = timeline(0.0, [0.5, 0.55, 0.6])  # TTFT 0.5, TPOT 0.05
    slow_start = timeline(0.0, [1.5, 1.55])  # TTFT too high
    slow_decode = timeline(0.0, [0.2, 0.5, 0.8])  # TPOT 0.3 too high
    one_token = timeline(0.0, [0.9])  # TPOT counts as 0
    failed = timeline(0.0, [0.1, 0.2])
    failed.error = "x"
    recs = [fast, slow_start, slow_decode, one_token, failed]
    assert [meets_slos(r, slos) for r in recs] == [True, False, False, True, False]
    s = summarize(recs, duration=2.0, slos=slos)
    assert s["good_requests"] == 2
    assert s["goodput"] == pytest.approx(1.0)
    assert s["good_fraction"] == pytest.approx(0.4)


def test_workloads_are_seeded_and_in_range():
    a = offline_requests(50, 32000, seed=3)
    assert a == offline_requests(50, 32000, seed=3)
    assert a != offline_requests(50, 32000, seed=4)
    assert all(64 <= len(r.prompt) <= 512 and 32 <= r.max_tokens <= 256 for r in a)
    assert all(100 <= t < 31900 for r in a for t in r.prompt)
    w4 = shared_prefix_requests(4, 1024, prefix_len=64, unique_len=8, output_len=5)
    assert all(r.prompt[:64] == w4[0].prompt[:64] and len(r.prompt) == 72 and r.max_tokens == 5 for r in w4)
    assert len({tuple(r.prompt[64:]) for r in w4}) == 4


def test_poisson_offsets_scale_with_rate():
    slow, fast = poisson_offsets(200, 1.0, seed=1), poisson_offsets(200, 4.0, seed=1)
    assert slow[0] == 0.0 and all(b >= a for a, b in zip(slow, slow[1:]))
    assert fast == pytest.approx([t / 4 for t in slow])
    assert 150 < slow[-1] < 250  # 199 gaps of mean 1 s
