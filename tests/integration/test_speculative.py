"""Speculative decoding through the whole stack: greedy output equals transformers' for
every proposer on a real model, drafts are kept where the text is predictable, and the
counters reach /metrics' source (``stats``)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.deploy import launch
from tests.http.shim import serve_http
from tests.integration.test_disaggregation import metric
from tests.reference import assert_greedy_equal, hf_greedy
from xllm.models.loader import gguf_path, load_tokenizer
from xllm.sdk import AsyncClient

PASSAGE = ("The lighthouse keeper climbed the stairs every evening at dusk. He trimmed the wick, "
           "polished the great lens, and wrote the weather in a small leather book.")
TASKS = [f"Repeat this text exactly, word for word:\n\n{PASSAGE}",
         f"Rewrite this text in the present tense:\n\n{PASSAGE}"]


async def _run(address: str, prompts: list[list[int]], n: int):
    async with AsyncClient(address) as c:
        outs = [await c.generate(prompt_token_ids=p, max_tokens=n, temperature=0.0, ignore_eos=True)
                for p in prompts]
        return outs, await c.call("stats")


@pytest.fixture(scope="module")
def tasks(smollm2):
    """The tasks' prompt ids and transformers' greedy continuations (computed once)."""
    path = str(gguf_path(smollm2))
    tok = load_tokenizer(smollm2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for t in TASKS]
    return prompts, [hf_greedy(path, p, 40) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["suffix", "ngram"])
def test_speculation_keeps_greedy_output_on_the_real_model(method, smollm2, tasks, tmp_path):
    path = str(gguf_path(smollm2))
    prompts, refs = tasks
    with serve_http(smollm2, tmp_path, "--dtype", "float32", "--speculative", method) as shim:
        outs, stats = asyncio.run(_run(shim.dep.address, prompts, 40))
        metrics = shim.get("/metrics").body.decode()
    for prompt, out, ref in zip(prompts, outs, refs):
        assert_greedy_equal(path, prompt, out.token_ids, ref, torch.float32)
    # copying a passage: most drafts are right, and a step gives several tokens
    assert stats["spec_accepted_tokens"] > 0.5 * stats["spec_draft_tokens"] > 0
    assert stats["num_steps"] < sum(len(o.token_ids) for o in outs) * 0.75
    assert metric(metrics, "xllm:spec_decode_num_draft_tokens") == stats["spec_draft_tokens"]
    assert metric(metrics, "xllm:spec_decode_num_accepted_tokens") == stats["spec_accepted_tokens"]
    per_pos = stats["spec_accepted_per_position"]
    assert sum(per_pos) == stats["spec_accepted_tokens"] and per_pos == sorted(per_pos, reverse=True)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--max-num-batched-tokens", "7", "--num-kv-blocks", "20", "--block-size", "8")],
                         ids=["plain", "chunked-preemption"])
def test_mtp_speculation_keeps_greedy_output(flags, make_tiny, tmp_path):
    """The checkpoint's MTP layer drafts (random here, so few drafts are kept); the output is
    transformers' (which skips the MTP layer) token for token, with prefix caching, async
    scheduling, chunked prefill and preemption."""
    from tests.integration.test_scheduling_equality import workload
    from tests.reference import generate_all

    path = str(make_tiny("tiny-llama-mtp"))
    prompts, max_tokens = workload()
    with launch(path, tmp_path, "--speculative", "mtp", "--speculative-max-batch", "64",
                "--no-instance-profile", *flags) as dep:
        outs = asyncio.run(generate_all(dep.address, prompts, max_tokens))
        async def stats():
            async with AsyncClient(dep.address) as c:
                return await c.call("stats")
        st = asyncio.run(stats())
    for prompt, out, n in zip(prompts, outs, max_tokens):
        assert_greedy_equal(path, prompt, out, hf_greedy(path, prompt, n))
    assert st["spec_draft_tokens"] > 0
    if flags:
        assert st["num_preemptions"] > 0
