"""The offline API: ``LLM(...).generate`` and ``.chat`` equal what the SDK gets from a
deployment started the same way, in order; the object stops every process it started,
on leaving ``with`` (also by an exception) and at interpreter exit."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time

import psutil
import pytest

from tests.deploy import launch
from xllm import LLM, SamplingParams
from xllm.sdk import AsyncClient

WORDS = ["sea", "bread", "light", "train", "snow", "market", "river", "stone", "clock", "field"]
ARGS = {"dtype": "float32", "enforce_eager": True}


def prompts(n: int) -> list[str]:
    rng = random.Random(3)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


async def sdk_outputs(address: str, texts: list[str], params: list[dict]) -> list[list[int]]:
    async with AsyncClient(address) as c:
        done = await asyncio.gather(*(c.generate(t, **p) for t, p in zip(texts, params)))
    return [d.token_ids for d in done]


@pytest.fixture(scope="module")
def llm(make_tiny):
    with LLM(make_tiny("tiny-llama"), **ARGS) as llm:
        yield llm


def test_generate_100_prompts_equals_the_sdk(llm, make_tiny, tmp_path):
    texts = prompts(100)
    # greedy for half, seeded sampling for the other half; lengths vary
    params = [{"max_tokens": 4 + i % 13, "temperature": 0.0, "ignore_eos": True} if i % 2 else
              {"max_tokens": 4 + i % 11, "temperature": 0.9, "top_p": 0.9, "seed": i, "ignore_eos": True}
              for i in range(100)]
    outs = llm.generate(texts, [SamplingParams(**p) for p in params])
    with launch(make_tiny("tiny-llama"), tmp_path, "--dtype", "float32", "--enforce-eager") as dep:
        ref = asyncio.run(sdk_outputs(dep.address, texts, params))
    assert [o.prompt for o in outs] == texts
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p["max_tokens"] for p in params]


def test_token_id_prompts_one_params_for_all_and_chat(llm):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    by_ids = llm.generate([[5, 6, 7], [9, 10]], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in by_ids] == [[5, 6, 7], [9, 10]]
    assert [o.num_prompt_tokens for o in by_ids] == [3, 2]
    conv = [{"role": "user", "content": "hello there"}]
    one = llm.chat(conv, params, use_tqdm=False)
    two = llm.chat([conv, [{"role": "user", "content": "a river"}]], params, use_tqdm=False)
    assert len(one) == 1 and len(two) == 2
    assert one[0].outputs[0].token_ids == two[0].outputs[0].token_ids
    assert len(two[1].outputs[0].token_ids) == 6


def test_bad_engine_argument_is_named_before_anything_starts(make_tiny):
    with pytest.raises(ValueError, match="block-size"):
        LLM(make_tiny("tiny-llama"), block_size="many")
    with pytest.raises(ValueError, match="no_such_flag|no-such-flag"):
        LLM(make_tiny("tiny-llama"), no_such_flag=1)


SCRIPT = """
import json, sys
from xllm import LLM
mode, model, out = sys.argv[1:]
if mode == "with":
    with LLM(model, dtype="float32", enforce_eager=True) as llm:
        json.dump(sorted(llm.pids.values()), open(out, "w"))
        raise RuntimeError("the user's code failed")
llm = LLM(model, dtype="float32", enforce_eager=True)
json.dump(sorted(llm.pids.values()), open(out, "w"))
raise RuntimeError("the user's code failed, no with block")
"""


@pytest.mark.parametrize("mode", ["with", "bare"])
def test_processes_stop_when_the_users_code_raises(make_tiny, tmp_path, mode):
    out = tmp_path / "pids.json"
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(make_tiny("tiny-llama")), str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 1 and "the user's code failed" in done.stderr
    pids = json.loads(out.read_text())
    assert len(pids) >= 4  # launcher's actors: frontend, router, scheduler, worker...
    deadline = time.monotonic() + 10  # a bound, not a measurement: the stop already ran
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if psutil.pid_exists(p)]}"
        time.sleep(0.1)
