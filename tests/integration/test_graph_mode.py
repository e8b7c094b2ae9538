"""Compiled decode graphs give the eager output (the one graph-mode test of the suite)."""

from __future__ import annotations

import asyncio

import pytest

from tests.deploy import launch
from tests.integration.test_equality import MAX_TOKENS, workload
from tests.reference import assert_greedy_equal, generate_all, hf_greedy


@pytest.mark.slow
def test_graph_mode_matches_transformers(make_tiny, tmp_path):
    path = make_tiny("tiny-qwen2")
    prompts = workload()
    # max-num-seqs 4: buckets 1, 2, 4; ten requests give every batch size from 4 down to 1;
    # single decode steps while requests wait, then several per plan (each through the graphs)
    with launch(path, tmp_path, "--max-num-seqs", "4", "--num-continuous-decode-steps", "3", graphs=True) as dep:
        ours = asyncio.run(generate_all(dep.address, prompts, MAX_TOKENS))
        log = dep.output()
    assert "decode graphs ready for batch sizes [1, 2, 4]" in log
    for bucket in (1, 2, 4):
        assert f"decode graph for batch size {bucket} in use" in log
    for prompt, n, out in zip(prompts, MAX_TOKENS, ours):
        assert_greedy_equal(str(path), prompt, out, hf_greedy(str(path), prompt, n))
