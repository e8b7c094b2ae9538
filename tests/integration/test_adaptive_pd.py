"""Adaptive PD under live traffic: two prefill instances and one decode instance whose
batch slots cannot keep up (``--max-num-seqs 2``) while clients keep streaming; the
router's controller turns a prefill instance into a decode instance while requests are in
flight. No request is lost or changed: every one finishes with all its tokens, each
prompt's output is the same before, during and after the change, the new decode instance
decodes, and no KV block is left held."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from tests.http.shim import serve_http
from xllm.sdk import AsyncClient

MAX_TOKENS = 24
PROMPTS = [[3 + (7 * k + j) % 200 for j in range(6 + k % 5)] for k in range(8)]
FLAGS = ("--pd", "2:1", "--adaptive-pd", "--router-policy", "slo_aware", "--slo-ttft-ms", "50", "--slo-tpot-ms",
         "1000", "--adaptive-pd-window", "3", "--adaptive-pd-hold", "1", "--adaptive-pd-cooldown", "600",
         "--max-num-seqs", "2", "--dtype", "float32")


async def traffic(address: str, clients: int = 10, after_change_s: float = 3.0, limit_s: float = 120.0):
    """Clients stream requests back to back until a role change has happened (and some
    seconds more); the outputs by prompt, the finish reasons and the router's stats."""
    outputs: dict[int, list[list[int]]] = {}
    reasons: list[str] = []
    stop = asyncio.Event()

    async def client(k: int, c: AsyncClient) -> None:
        n = k
        while not stop.is_set():
            p = n % len(PROMPTS)
            out = await c.generate(prompt_token_ids=PROMPTS[p], max_tokens=MAX_TOKENS, temperature=0.0,
                                   ignore_eos=True)
            outputs.setdefault(p, []).append(out.token_ids)
            reasons.append(out.finish_reason)
            n += clients

    async with AsyncClient(address) as c:
        running = [asyncio.ensure_future(client(k, c)) for k in range(clients)]
        deadline = time.monotonic() + limit_s  # a bound, not a measurement
        while (await c.call("stats"))["router"]["role_changes"] == 0:
            assert time.monotonic() < deadline, "no role change under a load one decode instance cannot serve"
            assert not any(t.done() for t in running), [t.exception() for t in running if t.done()]
            await asyncio.sleep(0.2)
        changed_at = len(reasons)
        await asyncio.sleep(after_change_s)
        stop.set()
        await asyncio.gather(*running)
        for _ in range(200):  # the prefill side lets go of its blocks a moment after (a bound)
            if (await c.call("check_integrity"))["used"] == 0:
                break
            await asyncio.sleep(0.05)
        stats = await c.call("stats")
        alone = [(await c.generate(prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=0.0,
                                   ignore_eos=True)).token_ids for p in PROMPTS]
    return outputs, reasons, changed_at, stats, alone


@pytest.mark.slow
def test_a_prefill_instance_becomes_a_decode_instance_under_live_traffic(make_tiny, tmp_path):
    with serve_http(make_tiny("tiny-llama"), tmp_path, *FLAGS) as shim:
        outputs, reasons, changed_at, stats, alone = asyncio.run(traffic(shim.dep.address))
        metrics = shim.get("/metrics").body.decode()
        log = shim.dep.output()
    router = stats["router"]
    assert router["role_changes"] == 1 and router["draining"] == {}
    assert sorted(router["roles"].values()) == ["decode", "decode", "prefill"]
    assert len(reasons) > changed_at > 0  # requests finished before and after the change
    assert all(r == "length" for r in reasons)
    for p, outs in outputs.items():
        assert all(o == alone[p] for o in outs), f"prompt {p}: outputs differ across the role change"
    flipped = next(iid for iid, role in router["roles"].items() if role == "decode" and iid != "i2")
    assert stats["instances"][flipped]["total_output_tokens"] > 0  # it decodes now
    assert stats["instances"][flipped]["role_changes"] == 1
    assert stats["instances"]["i2"]["kv_recomputed"] == 0
    assert re.search(r"^xllm:role_changes\{[^}]*\} 1\.0$", metrics, re.M)
    assert re.search(rf'^xllm:instance_role\{{instance="{flipped}",model_name="[^"]+",role="decode"\}} 1\.0$',
                     metrics, re.M)
    assert f"adaptive PD: {flipped} becomes decode" in log and f"instance {flipped} is decode now" in log
