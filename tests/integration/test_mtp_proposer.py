"""The MTP proposer on a real worker (a ``ModelRunner`` in this process): after steps of
prefill, verification and chained drafts, its next drafts are what the checkpoint's MTP
layer predicts when computed afresh over the whole sequence (the incremental hidden
states and KV it keeps are the right ones)."""

from __future__ import annotations

import pytest
import torch

from xllm.config import CacheConfig, ModelConfig, SpeculativeConfig, read_hf_config
from xllm.models.mtp import MultiTokenPredictor
from xllm.protocol import NewRequestData, SamplingParams, StepPlan
from xllm.worker.kv_cache import allocate_kv_cache
from xllm.worker.model_runner import ModelRunner
from xllm.worker.step_inputs import step_inputs
from xllm_tools import make_model

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.inference_mode()
def _fresh_drafts(runner: ModelRunner, tokens: list[int], k: int) -> list[int]:
    """The MTP layer's greedy chain after ``tokens``, computed over the whole sequence anew."""
    main, spec = runner.model, runner.spec
    mtp = MultiTokenPredictor(spec, main)
    mtp.load_state_dict(runner.proposer.mtp.state_dict())
    saved = [(a.k_cache, a.v_cache) for a in main.attention_layers()]
    allocate_kv_cache(main.attention_layers(), 8, 16, torch.float32)  # scratch caches
    allocate_kv_cache(mtp.attention_layers(), 8, 16, torch.float32)
    try:
        blocks = list(range(8))
        n = len(tokens)
        inp = step_inputs(["r"], [tokens], [blocks], [n - 1], [0], 16, [n - 1])
        hidden = main(inp.input_ids, inp.positions, inp.meta)  # positions 0 .. n-2
        seq = tokens[1:]
        inp = step_inputs(["r"], [seq], [blocks], [n - 1], [0], 16)
        y = mtp(inp.input_ids, inp.positions, hidden, inp.meta)[-1:]
        out = [int(mtp.compute_logits(y).argmax())]
        for j in range(1, k):
            seq = seq + out[-1:]
            inp = step_inputs(["r"], [seq], [blocks], [1], [n - 2 + j], 16)
            y = mtp(inp.input_ids, inp.positions, y, inp.meta)
            out.append(int(mtp.compute_logits(y).argmax()))
        return out
    finally:
        for a, (kc, vc) in zip(main.attention_layers(), saved):
            a.k_cache, a.v_cache = kc, vc


@pytest.mark.slow
def test_mtp_drafts_equal_the_layer_computed_afresh(tmp_path, one_thread):
    path = make_model("tiny-llama-mtp", tmp_path / "m")
    k = 3
    runner = ModelRunner(ModelConfig(str(path)), CacheConfig(16, 16), read_hf_config(path),
                         speculative=SpeculativeConfig("mtp", num_tokens=k))
    seen: list[tuple[list[int], list[int]]] = []
    propose = runner.proposer.propose

    def spy(wanted):
        drafts = propose(wanted)
        seen.append((list(runner.proposer.known["r"]), drafts["r"]))
        return drafts

    runner.speculator.proposer.propose = spy
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19]
    blocks = list(range(8))
    runner.execute(StepPlan(1, [NewRequestData("r", prompt, blocks, GREEDY, len(prompt))], {}, ["r"],
                            [12], [0], []))  # a first chunk of the prompt
    runner.execute(StepPlan(2, [], {}, ["r"], [len(prompt) - 12], [12], []))  # the rest: samples one
    for step in range(3, 9):
        known = len(runner.requests["r"].token_ids)
        runner.execute(StepPlan(step, [], {}, ["r"], [1 + k], [known - 1], []))
    assert len(seen) == 6 and all(d for _, d in seen)
    for tokens, drafts in seen[-2:]:
        assert drafts == _fresh_drafts(runner, tokens, len(drafts))
