"""Sampling features through the whole stack (SDK -> frontend -> scheduler -> worker)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.deploy import launch
from tests.reference import hf_model
from xllm.sdk import AsyncClient

PROMPT = [11, 22, 33, 44, 55, 66, 77]


MODES = {"single-step": (), "multi-step": ("--num-continuous-decode-steps", "4"),
         "speculative": ("--speculative", "suffix")}


@pytest.fixture(scope="module", params=list(MODES))
def deployment(request, make_tiny, tmp_path_factory):
    path = make_tiny("tiny-llama")
    with launch(path, tmp_path_factory.mktemp("sampling"), *MODES[request.param]) as dep:
        dep.model_path = path
        yield dep


def run(coro_fn, dep):
    async def main():
        async with AsyncClient(dep.address) as c:
            return await coro_fn(c)
    return asyncio.run(main())


def test_same_seed_same_output_different_seed_different(deployment):
    async def go(c):
        kw = dict(prompt_token_ids=PROMPT, max_tokens=24, temperature=1.0, ignore_eos=True)
        a, b, other = await asyncio.gather(c.generate(seed=7, **kw), c.generate(seed=7, **kw),
                                           c.generate(seed=8, **kw))
        return a.token_ids, b.token_ids, other.token_ids
    a, b, other = run(go, deployment)
    assert a == b and a != other


def test_top_k_one_and_temperature_zero_agree(deployment):
    async def go(c):
        kw = dict(prompt_token_ids=PROMPT, max_tokens=16, ignore_eos=True)
        return [(await c.generate(**kw, **extra)).token_ids
                for extra in ({"temperature": 0.0}, {"temperature": 1.3, "top_k": 1})]
    greedy, top1 = run(go, deployment)
    assert greedy == top1


def test_logprobs_match_the_reference_model(deployment):
    async def go(c):
        return await c.generate(prompt_token_ids=PROMPT, max_tokens=6, temperature=0.0,
                                ignore_eos=True, logprobs=3)
    out = run(go, deployment)
    assert len(out.deltas[-1].logprobs) == 6
    model = hf_model(str(deployment.model_path))
    seq = PROMPT + out.token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
    for i, entry in enumerate(out.deltas[-1].logprobs):
        pos = len(PROMPT) - 1 + i
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(ref[pos, entry.token_id]), abs=1e-3)
        assert [t for t, _, _ in entry.top] == ref[pos].topk(3).indices.tolist()


def test_logit_bias_forces_a_token(deployment):
    async def go(c):
        return await c.generate(prompt_token_ids=PROMPT, max_tokens=8, temperature=1.0,
                                ignore_eos=True, logit_bias={123: 100.0})
    assert run(go, deployment).token_ids == [123] * 8


def test_stop_strings_and_stop_token_ids(deployment):
    async def go(c):
        base = await c.generate(prompt_token_ids=PROMPT, max_tokens=40, temperature=0.0, ignore_eos=True)
        stop = base.text[len(base.text) // 2: len(base.text) // 2 + 3]
        cut = await c.generate(prompt_token_ids=PROMPT, max_tokens=40, temperature=0.0,
                               ignore_eos=True, stop=[stop])
        streamed = [d async for d in c.stream(prompt_token_ids=PROMPT, max_tokens=40,
                                               temperature=0.0, ignore_eos=True, stop=[stop])]
        by_id = await c.generate(prompt_token_ids=PROMPT, max_tokens=40, temperature=0.0,
                                 ignore_eos=True, stop_token_ids=[base.token_ids[5]])
        return base, stop, cut, streamed, by_id
    base, stop, cut, streamed, by_id = run(go, deployment)
    assert cut.finish_reason == "stop"
    assert cut.text == base.text[: base.text.index(stop)]
    assert "".join(d.text for d in streamed) == cut.text
    assert streamed[-1].finish_reason == "stop"
    # the tokens end at the one that completes the stop string, even when several come in one
    # message (--stream-interval): none after it is counted or returned
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(deployment.model_path)
    n = len(cut.token_ids)
    assert cut.token_ids == base.token_ids[:n]
    assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])
    assert sum(len(d.token_ids) for d in streamed) == n
    first = base.token_ids.index(base.token_ids[5])
    assert by_id.token_ids == base.token_ids[: first + 1] and by_id.finish_reason == "stop"


def test_abort_frees_kv_at_once(deployment):
    async def go(c):
        got = 0
        async for _ in c.stream(prompt_token_ids=PROMPT * 8, max_tokens=1000, temperature=0.0,
                                ignore_eos=True):
            got += 1
            if got == 3:
                break  # leaving the stream aborts the request
        for _ in range(100):
            stats = await c.call("stats")
            if stats["num_running"] == 0 and stats["kv_usage"] == 0.0:
                return stats
            await asyncio.sleep(0.05)
        return stats
    stats = run(go, deployment)
    assert stats["num_running"] == 0 and stats["kv_usage"] == 0.0 and stats["num_aborted"] >= 1
