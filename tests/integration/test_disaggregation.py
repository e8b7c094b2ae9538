"""Prefill/decode disaggregation on one machine (``--pd 1:1``): the prompt is prefilled by
one instance, its KV pushed layer by layer by the KV agents into the other, which
decodes. Outputs equal the mixed run token for token; no block is left held."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.deploy import launch
from tests.http.shim import serve_http
from xllm.sdk import AsyncClient

CHUNK = 64  # --max-num-batched-tokens: the long prompt takes three chunks
SHARED = [7 + (i * 13) % 200 for i in range(40)]  # a prefix two requests share (hits on the prefill side)
PROMPTS = [
    [3, 4, 5, 6],
    [11 + (i * 7) % 300 for i in range(150)],  # longer than one chunk
    SHARED + [21, 22, 23],
]
LATER = SHARED + [31, 32, 33, 34]  # sent after the others: the prefill side holds SHARED
GREEDY = {"max_tokens": 10, "ignore_eos": True, "temperature": 0.0}
SEEDED = {"max_tokens": 10, "ignore_eos": True, "temperature": 0.9, "top_p": 0.9, "seed": 7}


async def serve(address: str) -> dict:
    async with AsyncClient(address) as c:
        outs = await asyncio.gather(*(c.generate(prompt_token_ids=p, **GREEDY) for p in PROMPTS),
                                    c.generate(prompt_token_ids=PROMPTS[0], **SEEDED))
        later = await c.generate(prompt_token_ids=LATER, **GREEDY)
        stats = await released(c)
    return {"tokens": [o.token_ids for o in [*outs, later]],
            "reasons": [o.finish_reason for o in [*outs, later]], "stats": stats}


async def released(c: AsyncClient, timeout: float = 30.0) -> dict:
    """The stats once no instance holds a block for a request (the prefill side lets go
    a moment after the decode side has the KV)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout  # a bound, not a measurement
    while True:
        if (await c.call("check_integrity"))["used"] == 0:
            return await c.call("stats")
        assert loop.time() < deadline, "blocks still held after every request ended"
        await asyncio.sleep(0.05)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


@pytest.mark.parametrize("preset,dtype", [("tiny-llama", "float32"), ("tiny-qwen2", "bfloat16"),
                                          pytest.param("tiny-llama", "bfloat16", marks=pytest.mark.slow),
                                          pytest.param("tiny-qwen2", "float32", marks=pytest.mark.slow)])
def test_prefill_transfer_decode_equals_the_mixed_run(make_tiny, tmp_path, preset, dtype):
    model = make_tiny(preset)
    common = ("--dtype", dtype, "--max-num-batched-tokens", str(CHUNK))
    with launch(model, tmp_path / "mixed", *common) as dep:
        mixed = asyncio.run(serve(dep.address))
    (tmp_path / "pd").mkdir()
    with serve_http(model, tmp_path / "pd", *common, "--pd", "1:1") as shim:
        pd = asyncio.run(serve(shim.dep.address))
        metrics = shim.get("/metrics").body.decode()
    assert pd["tokens"] == mixed["tokens"]
    assert pd["reasons"] == ["length"] * len(pd["tokens"])
    prefill, decode = pd["stats"]["instances"]["i0"], pd["stats"]["instances"]["i1"]
    n = len(PROMPTS) + 2
    # every request went prefill -> transfer -> decode; none fell back to recomputing
    assert prefill["kv_transfers"] == decode["kv_transfers"] == n
    assert decode["kv_recomputed"] == 0 and decode["kv_transfer_failures"] == 0
    assert prefill["kv_transfer_bytes"] == decode["kv_transfer_bytes"] > 0
    assert prefill["prefix_cache_hits"] >= len(SHARED) // 16 * 16  # LATER reused SHARED there
    assert prefill["total_output_tokens"] == 0  # the prefill side streams nothing itself
    assert decode["total_output_tokens"] == n * GREEDY["max_tokens"]
    assert metric(metrics, "xllm:kv_transfers") == n
    assert metric(metrics, "xllm:kv_transfer_bytes") == decode["kv_transfer_bytes"]
    assert metric(metrics, "xllm:kv_transfers_in_flight") == 0
    assert metric(metrics, "xllm:kv_recomputed") == 0
