"""The stream interval: what a client receives is every token once, in order; the first
token and the finish are never held; held tokens leave after N steps or the delay cap."""

from __future__ import annotations

import random

import pytest

from xllm.scheduler.outputs import StepOutputs
from xllm.scheduler.stream import StreamBuffer


def step(*rows) -> StepOutputs:
    """rows: (req id, tokens, finish reason)."""
    out = StepOutputs()
    out.rows = [(rid, list(tokens), reason, 0, 0.0, None, "route") for rid, tokens, reason in rows]
    return out


def sent(out: StepOutputs) -> dict:
    return {row[0]: (row[1], row[2]) for row in out.rows}


def test_interval_one_sends_every_step_untouched():
    buf = StreamBuffer(1)
    out = step(("a", [1], None))
    assert buf.add(0, out, 0.0) is out and not buf


def test_first_token_at_once_then_every_n_steps_and_the_finish_at_once():
    buf = StreamBuffer(3)
    assert sent(buf.add(0, step(("a", [1], None)), 0.0)) == {"a": ([1], None)}  # TTFT is not delayed
    assert sent(buf.add(1, step(("a", [2], None)), 0.001)) == {}
    assert sent(buf.add(2, step(("a", [3], None)), 0.002)) == {}
    assert sent(buf.add(3, step(("a", [4], None)), 0.003)) == {"a": ([2, 3, 4], None)}
    assert sent(buf.add(4, step(("a", [5], None)), 0.004)) == {}
    assert sent(buf.add(5, step(("a", [6], "length")), 0.005)) == {"a": ([5, 6], "length")}
    assert not buf and buf.deadline() is None


def test_nothing_waits_longer_than_the_delay_cap():
    buf = StreamBuffer(100, max_delay_s=0.05)
    buf.add(0, step(("a", [1], None)), 0.0)
    assert sent(buf.add(1, step(("a", [2], None)), 0.01)) == {}
    assert buf.deadline() == pytest.approx(0.06) and not buf.due(0.059) and buf.due(0.061)
    assert sent(buf.add(2, step(("a", [3], None)), 0.07)) == {"a": ([2, 3], None)}


def test_an_abort_carries_the_held_tokens_before_it():
    buf = StreamBuffer(4)
    buf.add(0, step(("a", [1], None), ("b", [7], None)), 0.0)
    buf.add(1, step(("a", [2], None), ("b", [8], None)), 0.0)
    assert sent(buf.add(-1, step(("a", [], "abort")), 0.0)) == {"a": ([2], "abort")}
    assert sent(buf.take()) == {"b": ([8], None)}


@pytest.mark.parametrize("interval", [2, 4, 7])
def test_every_token_arrives_once_in_order(interval):
    rng = random.Random(interval)
    buf = StreamBuffer(interval)
    lengths = {f"r{i}": rng.randint(1, 40) for i in range(12)}
    made = {rid: 0 for rid in lengths}
    got: dict[str, list[int]] = {rid: [] for rid in lengths}
    finished = set()
    t = 0
    while len(finished) < len(lengths):
        rows = []
        for rid, n in lengths.items():
            if made[rid] < n and rng.random() < 0.8:
                made[rid] += 1
                rows.append((rid, [made[rid]], "stop" if made[rid] == n else None))
        t += 1
        for rid, (tokens, reason) in sent(buf.add(t, step(*rows), t * 0.001)).items():
            got[rid] += tokens
            if reason:
                finished.add(rid)
        if rng.random() < 0.1:  # the scheduler went idle and sent what was held
            for rid, (tokens, _) in sent(buf.take()).items():
                got[rid] += tokens
    assert got == {rid: list(range(1, n + 1)) for rid, n in lengths.items()}
    assert not buf and not buf.started
