"""The same seed gives the same text whether or not a request was preempted."""

from __future__ import annotations

import asyncio

import pytest

from tests.deploy import launch
from xllm.sdk import AsyncClient

N = 16


async def _seeded_run(address: str) -> tuple[list[list[int]], dict]:
    async with AsyncClient(address) as c:
        outs = await asyncio.gather(*(
            c.generate(prompt_token_ids=[(7 * i + j) % 900 + 3 for j in range(12 + i)], max_tokens=96,
                       temperature=1.0, seed=1000 + i, ignore_eos=True) for i in range(N)))
        stats = await c.call("stats")
    return [o.token_ids for o in outs], stats


@pytest.mark.slow
def test_seeded_sampling_across_preemption_equals_the_unpreempted_run(make_tiny, tmp_path):
    path = make_tiny("tiny-llama")
    with launch(path, tmp_path / "big") as dep:
        roomy, roomy_stats = asyncio.run(_seeded_run(dep.address))
    # 16 requests of ~120 tokens need ~128 blocks of 16: with 40 some are preempted
    with launch(path, tmp_path / "small", "--num-kv-blocks", "40") as dep:
        tight, tight_stats = asyncio.run(_seeded_run(dep.address))
    assert roomy_stats["num_preemptions"] == 0
    assert tight_stats["num_preemptions"] > 0
    for i, (a, b) in enumerate(zip(roomy, tight)):
        assert a == b, f"request {i} (seed {1000 + i}) differs after preemption"
