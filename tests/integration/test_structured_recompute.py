"""Structured output where a worker's request state is created with output tokens already
generated: preemption and recompute (a KV pool too small for the batch), and the decode
side of prefill/decode disaggregation (the first token came from the prefill instance).
Every output must still validate: a fresh matcher is fed the earlier tokens first."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from tests.deploy import launch
from xllm.protocol import StructuredOutput
from xllm.sdk import AsyncClient

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["tags", "n"],
          "properties": {"tags": {"type": "array", "minItems": 4, "maxItems": 4,
                                  "items": {"type": "string", "minLength": 24, "maxLength": 30}},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999}}}
SO = StructuredOutput("json_schema", json.dumps(SCHEMA))
N = 16


async def _run(address: str) -> tuple[list, dict]:
    async with AsyncClient(address) as c:
        outs = await asyncio.gather(*(
            c.generate(prompt_token_ids=[(5 * i + j) % 900 + 3 for j in range(10 + i)], max_tokens=400,
                       temperature=1.0, seed=i, structured=SO) for i in range(N)))
        return outs, await c.call("stats")


def _check(outs) -> None:
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)


@pytest.mark.slow
def test_structured_output_survives_preemption(make_tiny, tmp_path):
    # 16 requests of 100+ tokens need far more than 40 blocks of 16: some are preempted
    with launch(make_tiny("tiny-llama"), tmp_path, "--num-kv-blocks", "40") as dep:
        outs, stats = asyncio.run(_run(dep.address))
    assert stats["num_preemptions"] > 0
    _check(outs)


@pytest.mark.slow
def test_structured_output_across_prefill_decode_disaggregation(make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path, "--pd", "1:1") as dep:
        outs, _ = asyncio.run(_run(dep.address))
    _check(outs)
