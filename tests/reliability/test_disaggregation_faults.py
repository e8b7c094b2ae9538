"""Prefill/decode disaggregation when things go wrong mid-transfer: a stuck prefill
agent (the transfer times out: the decode side computes the prompt itself), a client
abort during the transfer, and a KV agent or a scheduler of either side killed. Each request
ends (done with the right tokens, or a clear error), nothing hangs, and afterwards no
block is held on either side."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.cluster.hosts import wait_instances
from tests.deploy import launch
from xllm.sdk import AsyncClient

GREEDY = {"max_tokens": 24, "ignore_eos": True, "temperature": 0.0}
PROMPTS = [[5 + k + (i * 11) % 250 for i in range(120)] for k in range(6)]
BOUND_S = 120.0  # how long any request may take here at most (a bound, not a measurement)


async def no_block_held(c: AsyncClient, timeout: float = 30.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await c.call("check_integrity"))["used"] != 0:
        assert loop.time() < deadline, "KV blocks still held after every request ended"
        await asyncio.sleep(0.1)
    return await c.call("stats")


def test_a_stuck_transfer_times_out_and_a_client_abort_frees_both_sides(make_tiny, tmp_path):
    model = make_tiny("tiny-llama")
    with launch(model, tmp_path, "--pd", "1:1", "--kv-transfer-timeout", "3") as dep:
        async def scenario() -> None:
            async with AsyncClient(dep.address) as c:
                expected = (await c.generate(prompt_token_ids=PROMPTS[0], **GREEDY)).token_ids
                os.kill(dep.pids["i0.kv-agent"], signal.SIGSTOP)  # the prefill side's KV goes nowhere
                try:
                    slow = asyncio.ensure_future(c.generate(prompt_token_ids=PROMPTS[0], **GREEDY))
                    gone = asyncio.ensure_future(c.generate(prompt_token_ids=PROMPTS[1], req_id="gone", **GREEDY))
                    await asyncio.sleep(0.5)
                    await c.abort("gone")
                    aborted = await asyncio.wait_for(gone, BOUND_S)
                    recomputed = await asyncio.wait_for(slow, BOUND_S)
                finally:
                    os.kill(dep.pids["i0.kv-agent"], signal.SIGCONT)
                assert aborted.finish_reason == "abort"
                # the decode side gave up on the transfer and computed the prompt itself
                assert recomputed.finish_reason == "length" and recomputed.token_ids == expected
                stats = await no_block_held(c)
                assert stats["instances"]["i1"]["kv_recomputed"] == 1
                assert stats["instances"]["i0"]["kv_transfer_failures"] >= 1  # released on its agent's word
                # and the pair works again
                again = await c.generate(prompt_token_ids=PROMPTS[0], **GREEDY)
                assert again.token_ids == expected
                after = await no_block_held(c)
                assert after["instances"]["i1"]["kv_transfers"] == stats["instances"]["i1"]["kv_transfers"] + 1

        asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["i0.kv-agent", "i0.scheduler", "i1.kv-agent", "i1.scheduler"])
def test_killing_an_agent_or_a_scheduler_mid_transfer(make_tiny, tmp_path, victim):
    model = make_tiny("tiny-llama")
    with launch(model, tmp_path, "--pd", "1:1") as dep:
        async def scenario() -> None:
            async with AsyncClient(dep.address) as c:
                expected = [o.token_ids for o in await asyncio.gather(
                    *(c.generate(prompt_token_ids=p, **GREEDY) for p in PROMPTS))]
                await c.call("reset_prefix_cache")
                tasks = [asyncio.ensure_future(c.generate(prompt_token_ids=p, **GREEDY)) for p in PROMPTS]
                await asyncio.sleep(0.2)
                os.kill(dep.pids[victim], signal.SIGKILL)  # its instance is restarted
                outs = await asyncio.wait_for(asyncio.gather(*tasks), BOUND_S)
                for out, want in zip(outs, expected):
                    if out.finish_reason == "length":
                        assert out.token_ids == want
                    else:  # streamed part of its answer on the lost instance
                        assert out.finish_reason == "error" and "lost" in out.error
                assert dep.proc.poll() is None  # the deployment keeps serving
            await wait_instances(dep.address, 2)
            async with AsyncClient(dep.address) as c:
                again = await asyncio.wait_for(asyncio.gather(
                    *(c.generate(prompt_token_ids=p, **GREEDY) for p in PROMPTS[:2])), BOUND_S)
                assert [o.token_ids for o in again] == expected[:2]
                await no_block_held(c)

        asyncio.run(scenario())
