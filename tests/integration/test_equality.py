"""Greedy output through the whole multi-process stack equals transformers ``generate``."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.deploy import launch
from tests.reference import assert_greedy_equal, generate_all, hf_greedy

PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3",
           "tiny-llama-rope-llama3", "tiny-llama-rope-linear", "tiny-qwen2-rope-yarn"]
PROMPT_LENS = [1, 5, 17, 33, 64, 100, 7, 250, 3, 48]
MAX_TOKENS = [1, 9, 24, 40, 16, 33, 50, 12, 64, 20]


def workload(vocab: int = 1000) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_matches_transformers(preset, make_tiny, tmp_path):
    path = make_tiny(preset)
    prompts = workload()
    with launch(path, tmp_path, "--dtype", "float32") as dep:
        ours = asyncio.run(generate_all(dep.address, prompts, MAX_TOKENS))
    for prompt, n, out in zip(prompts, MAX_TOKENS, ours):
        assert_greedy_equal(str(path), prompt, out, hf_greedy(str(path), prompt, n))
