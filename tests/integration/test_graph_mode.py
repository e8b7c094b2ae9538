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


@pytest.mark.slow
@pytest.mark.parametrize("preset, method", [("tiny-qwen2", "suffix"), ("tiny-llama-mtp", "mtp")])
def test_verification_steps_run_through_the_graphs_and_keep_the_output(preset, method, make_tiny, tmp_path):
    """Speculative steps' verification runs as decode rows (each draft a row of its own)
    through the compiled graphs, whose buckets grow to hold a batch's drafts; greedy output
    stays transformers' (with an MTP layer, which reads the graphs' hidden states too)."""
    from xllm.sdk import AsyncClient

    path = make_tiny(preset)
    prompts = workload()
    # 4 requests x (1 + 3 drafts) rows: buckets up to 16, which only verification fills
    with launch(path, tmp_path, "--max-num-seqs", "4", "--speculative", method, "--num-speculative-tokens", "3",
                "--speculative-max-batch", "4", "--no-instance-profile", graphs=True) as dep:
        ours = asyncio.run(generate_all(dep.address, prompts, MAX_TOKENS))

        async def stats():
            async with AsyncClient(dep.address) as c:
                return await c.call("stats")
        st = asyncio.run(stats())
        log = dep.output()
    assert "decode graphs ready for batch sizes [1, 2, 4, 8, 16]" in log
    assert st["spec_draft_tokens"] > 0
    # more rows than the 4 requests: drafts verified through the graphs
    assert any(f"decode graph for batch size {b} in use" in log for b in (8, 16))
    for prompt, n, out in zip(prompts, MAX_TOKENS, ours):
        assert_greedy_equal(str(path), prompt, out, hf_greedy(str(path), prompt, n))
