"""Sampled output under speculation keeps the target model's distribution, on a real
worker (a ``ModelRunner`` in this process) with a draft fixed by the test.

The request's first token of a speculative step is drawn 3,000 times with a draft the
model finds likely but not certain; its frequencies must match the model's own
distribution at that position (temperature and top-k applied), by a chi-square test. A
rule that kept the draft too often, or drew the residual without removing the draft,
moves the draft token's frequency far past the test's bound.
"""

from __future__ import annotations

import pytest
import torch

from xllm.config import CacheConfig, ModelConfig, SpeculativeConfig, read_hf_config
from xllm.protocol import NewRequestData, SamplingParams, StepPlan
from xllm.worker.model_runner import ModelRunner
from xllm_tools import make_model

TOP_K = 4
CHI2_999 = {3: 16.27}  # the 0.999 quantile of chi-square with 3 degrees of freedom


class FixedDraft:
    """A proposer that always proposes the same tokens (the ``Proposer`` verbs)."""

    def __init__(self, draft: list[int]) -> None:
        self.draft = draft

    def add(self, req_id, token_ids, num_prompt_tokens):
        pass

    def extend(self, req_id, token_ids):
        pass

    def propose(self, wanted):
        return {rid: self.draft[:n] for rid, n in wanted.items()}

    def drop(self, req_id):
        pass


@pytest.fixture
def one_thread():
    """A tiny model steps several times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_first_token_of_a_speculative_step_follows_the_target_distribution(tmp_path, one_thread):
    path = make_model("tiny-llama", tmp_path / "m")
    runner = ModelRunner(ModelConfig(str(path)), CacheConfig(16, 16), read_hf_config(path),
                         speculative=SpeculativeConfig("suffix"))
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]
    sampling = SamplingParams(max_tokens=8, temperature=0.8, top_p=1.0, top_k=TOP_K, min_p=0.0)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    # the model's own distribution at the prompt's end, from a plain step
    _, logits = runner.step_logits(StepPlan(0, [NewRequestData("ref", prompt, [0, 1], greedy, len(prompt))], {},
                                            ["ref"], [len(prompt)], [0], ["ref"]))
    top = (logits[0] / 0.8).topk(TOP_K)
    p = torch.softmax(top.values, dim=-1)  # over the top-k tokens, most likely first
    draft = int(top.indices[1])  # likely, not certain
    runner.speculator.proposer = FixedDraft([draft, draft])
    counts = torch.zeros(TOP_K)
    n = 3000
    finished: list[str] = []
    for i in range(n):
        rid = f"r{i}"
        new = NewRequestData(rid, prompt, [0, 1], sampling, len(prompt))
        # the prompt's KV is already in blocks 0-1 (the plain step wrote it): verify from its last token
        plan = StepPlan(i + 1, [new], {}, [rid], [3], [len(prompt) - 1], finished)
        result = runner.execute(plan)
        first = result.token_ids[0]
        assert first in top.indices.tolist() and result.spec_counts[rid][0] == 2
        counts[top.indices.tolist().index(first)] += 1
        finished = [rid]
    expected = p * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[TOP_K - 1], (counts / n, p)
