"""Migration end to end: one prefill and two decode instances; while requests stream from
one decode instance it is drained (``drain``), its requests move to the other decode
instance with their KV (the aborts of those a client gives up on follow them), and every
output — greedy and seeded sampling — is the one the request gets without moving.
Afterwards the drained instance holds nothing, gets no new work, and no KV block is left
held anywhere."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.deploy import launch
from xllm.sdk import AsyncClient, XllmError

MAX_TOKENS = 320
PROMPTS = [[3 + (11 * k + j) % 300 for j in range(8 + 3 * k)] for k in range(6)]
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "seed": 11}


def decode_instances(stats: dict) -> list[str]:
    return sorted(i for i, s in stats["instances"].items() if s["role"] == "decode")


async def scenario(address: str) -> dict:
    async with AsyncClient(address) as c:
        alone = [(await c.generate(prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=0.0,
                                   ignore_eos=True)).token_ids for p in PROMPTS]
        alone_sampled = (await c.generate(prompt_token_ids=PROMPTS[0], max_tokens=MAX_TOKENS, ignore_eos=True,
                                          **SAMPLED)).token_ids
        got: dict[int, list[int]] = {}
        reasons: dict[int, str] = {}

        async def one(k: int, prompt: list[int], sampling: dict) -> None:
            async for d in c.stream(prompt_token_ids=prompt, max_tokens=MAX_TOKENS, ignore_eos=True, **sampling):
                got.setdefault(k, []).extend(d.token_ids)
                if d.finish_reason:
                    reasons[k] = d.finish_reason

        work = [(k, p, {"temperature": 0.0}) for k, p in enumerate(PROMPTS)] + [(len(PROMPTS), PROMPTS[0], SAMPLED)]
        # three more that the client gives up on once they have moved (round robin put one on each side at least)
        extra = [(100 + k, PROMPTS[k], {"temperature": 0.0}) for k in range(3)]
        streams = [asyncio.ensure_future(one(*w)) for w in work]
        dropped = [asyncio.ensure_future(one(*w)) for w in extra]
        deadline = time.monotonic() + 60  # a bound, not a measurement
        while len(got) < len(work) + len(extra) or min(map(len, got.values())) < 4:
            assert time.monotonic() < deadline and not any(t.done() for t in streams + dropped)
            await asyncio.sleep(0.005)
        before = await c.call("stats")
        victim = max(decode_instances(before), key=lambda i: before["instances"][i]["num_running"])
        drained = await c.call("drain", instance=victim)
        async def source_busy() -> bool:  # until every hand-over is done, KV and all
            src = (await c.call("stats"))["instances"][victim]
            return any(src[k] for k in ("num_running", "migrations_in_flight", "kv_transfers_in_flight"))

        while await source_busy():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        for t in dropped:  # the SDK aborts a stream it stops reading
            t.cancel()
        await asyncio.gather(*dropped, return_exceptions=True)
        await asyncio.gather(*streams)
        for _ in range(200):  # the source lets go of its blocks a moment after the target has them
            if (await c.call("check_integrity"))["used"] == 0:
                break
            await asyncio.sleep(0.05)
        after = await c.call("stats")
        later = (await c.generate(prompt_token_ids=PROMPTS[1], max_tokens=8, temperature=0.0,
                                  ignore_eos=True)).token_ids
        last = await c.call("stats")
        with pytest.raises(XllmError, match="registered instance"):
            await c.call("drain", instance="nobody")
        return dict(alone=alone, alone_sampled=alone_sampled, got=got, reasons=reasons, before=before,
                    victim=victim, drained=drained, after=after, later=later, last=last)


@pytest.mark.slow
def test_draining_a_decode_instance_moves_its_streams_with_the_same_outputs(make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path, "--pd", "1:2", "--dtype", "float32",
                "--router-policy", "round_robin") as dep:
        r = asyncio.run(scenario(dep.address))
    victim, after = r["victim"], r["after"]
    other = next(i for i in decode_instances(after) if i != victim)
    moving = r["before"]["instances"][victim]["num_running"]
    assert moving > 0 and r["drained"]["moving"] > 0
    assert all(r["reasons"][k] == "length" for k in range(len(PROMPTS) + 1))
    for k, prompt in enumerate(PROMPTS):
        assert r["got"][k] == r["alone"][k], f"prompt {k}: output changed by the move"
    assert r["got"][len(PROMPTS)] == r["alone_sampled"]  # seeded sampling draws per output index
    src, dst = after["instances"][victim], after["instances"][other]
    assert src["migrated_out"] >= 1 and dst["migrated_in"] == src["migrated_out"]
    assert src["migration_failures"] == dst["migration_failures"] == 0 and dst["kv_recomputed"] == 0
    assert src["num_running"] == 0 and src["migrations_in_flight"] == 0
    # aborts of the requests that moved reached where they went (through the router, or forwarded)
    assert src["num_aborted"] == 0 and dst["num_aborted"] == 3
    assert after["router"]["draining"] == {victim: "stop"}
    # the drained instance gets no new work
    assert r["last"]["instances"][victim]["total_output_tokens"] == src["total_output_tokens"]
    assert r["later"] == r["alone"][1][:8]
