"""A huge prompt is refused without stalling anyone; a big one is tokenized off the loop."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from tests.deploy import launch
from xllm.sdk import AsyncClient, BadRequestError

CONTEXT = 100_000


@pytest.fixture(scope="module")
def long_context_model(make_tiny, tmp_path_factory):
    """tiny-llama with a 200k-position context: prompts of megabytes are within the size
    bound, so they are really tokenized."""
    path = tmp_path_factory.mktemp("long") / "tiny-llama-long"
    shutil.copytree(make_tiny("tiny-llama"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 2 * CONTEXT
    (path / "config.json").write_text(json.dumps(cfg))
    return path


async def _race(address: str, big_prompt: str) -> tuple[list[str], int, BadRequestError]:
    """A stream runs; the big prompt goes out, then a small request. Returns the order the
    two requests finished in, the stream's deltas that arrived while the big prompt was
    being handled, and the big prompt's error."""
    order: list[str] = []
    deltas = 0
    async with AsyncClient(address) as c:
        async def stream() -> None:
            nonlocal deltas
            async for _ in c.stream(prompt_token_ids=[5, 6, 7], max_tokens=1500, ignore_eos=True):
                deltas += 1

        async def big() -> BadRequestError:
            try:
                await c.generate(big_prompt, max_tokens=4)
            except BadRequestError as exc:
                order.append("big")
                return exc
            raise AssertionError("the big prompt was accepted")

        async def small() -> None:
            await c.generate(prompt_token_ids=[9, 9], max_tokens=1)
            order.append("small")

        streaming = asyncio.ensure_future(stream())
        while deltas < 3:
            await asyncio.sleep(0.01)
        before = deltas
        big_task = asyncio.ensure_future(big())
        await asyncio.sleep(0)  # the big request goes out first
        await small()
        err = await big_task
        during = deltas - before
        streaming.cancel()  # leaving the stream aborts it
        await asyncio.gather(streaming, return_exceptions=True)
        return order, during, err


@pytest.mark.slow
def test_big_prompt_is_tokenized_off_the_loop(long_context_model, tmp_path):
    # ~400k tokens in 2 MB: under the size bound, so it is tokenized (for seconds), then refused
    with launch(long_context_model, tmp_path, "--max-model-len", str(CONTEXT), "--num-kv-blocks", "256") as dep:
        order, during, err = asyncio.run(_race(dep.address, "word " * 400_000))
    assert err.param == "prompt" and "context" in err.message
    # NOTE: on the loop, tokenizing the big prompt held back the stream and the request sent
    # after it; off the loop, the stream flows and the small request finishes meanwhile
    assert order == ["small", "big"]
    assert during >= 2


def test_huge_prompt_is_refused_by_its_size(make_tiny, tmp_path):
    with launch(make_tiny("tiny-llama"), tmp_path) as dep:
        order, _, err = asyncio.run(_race(dep.address, "x" * 50_000_000))
    assert err.param == "prompt" and "context" in err.message
    assert set(order) == {"small", "big"}
