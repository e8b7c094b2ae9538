"""Several instances of one host behind routers: same output, every instance used, the
prefix-aware router keeps a conversation where its cache is."""

from __future__ import annotations

import asyncio

import pytest

from tests.deploy import launch
from tests.integration.test_equality import MAX_TOKENS, workload
from tests.reference import assert_greedy_equal, hf_greedy
from xllm.deploy.plan import frontend_address
from xllm.sdk import AsyncClient


async def _through_both_frontends(addresses: list[str], prompts, max_tokens):
    clients = [AsyncClient(a) for a in addresses]
    try:
        outs = await asyncio.gather(*(
            clients[i % len(clients)].generate(prompt_token_ids=p, max_tokens=n, temperature=0.0,
                                               ignore_eos=True)
            for i, (p, n) in enumerate(zip(prompts, max_tokens))))
        stats = await clients[0].call("stats")
        integrity = await clients[1].call("check_integrity")
    finally:
        for c in clients:
            await c.close()
    return [o.token_ids for o in outs], stats, integrity


@pytest.mark.slow
def test_two_instances_two_routers_two_frontends_equal_transformers(make_tiny, tmp_path):
    path = make_tiny("tiny-llama")
    prompts = workload()
    with launch(path, tmp_path, "--dtype", "float32", "--instances", "2", "--routers", "2",
                "--frontends", "2", "--router-policy", "round_robin") as dep:
        addresses = [dep.address, frontend_address(dep.address, 1)]
        outs, stats, integrity = asyncio.run(_through_both_frontends(addresses, prompts, MAX_TOKENS))
    for prompt, n, out in zip(prompts, MAX_TOKENS, outs):
        assert_greedy_equal(str(path), prompt, out, hf_greedy(str(path), prompt, n))
    assert stats["num_instances"] == 2
    assert all(s["num_finished"] > 0 for s in stats["instances"].values()), "an instance got no request"
    assert integrity["used"] == 0


async def _conversations(address: str, turns: int = 3, conversations: int = 3, bs: int = 8):
    """Multi-turn chats resending their history. For each later turn: (prompt tokens that came
    from a cache, the tokens the previous turn left in its instance's cache)."""
    async with AsyncClient(address) as c:
        history = [[(7 * k + j) % 500 + 3 for j in range(40)] for k in range(conversations)]
        seen: list[tuple[int, int]] = []
        left = [0] * conversations
        for turn in range(turns):
            outs = await asyncio.gather(*(c.generate(prompt_token_ids=h, max_tokens=8, temperature=0.0,
                                                     ignore_eos=True) for h in history))
            if turn:
                seen += [(o.num_cached_tokens, n) for o, n in zip(outs, left)]
            # full blocks with KV: the prompt and every output token but the last
            left = [(len(h) + len(o.token_ids) - 1) // bs * bs for h, o in zip(history, outs)]
            history = [h + o.token_ids + [11, 12, 13] for h, o in zip(history, outs)]
            await _index_settled(c)
        return seen


async def _index_settled(c: AsyncClient) -> None:
    """Wait until the router's prefix index stops growing (its KV events have arrived)."""
    last = -1
    for _ in range(200):  # bounded
        now = (await c.call("stats"))["router"]["prefix_index_blocks"]
        if now == last:
            return
        last = now
        await asyncio.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["prefix_cache_aware", "round_robin"])
def test_prefix_aware_routing_keeps_conversations_on_their_cache(policy, make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path, "--instances", "2", "--router-policy", policy,
                "--block-size", "8") as dep:
        seen = asyncio.run(_conversations(dep.address))
    kept = [cached >= left for cached, left in seen]
    if policy == "prefix_cache_aware":
        assert all(kept), seen
    else:  # 3 conversations on 2 instances in turn: each later turn lands where its history is not
        assert not any(kept), seen
