"""Our model code against transformers on the same checkpoints, without processes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from xllm.config import CacheConfig, ModelConfig, read_hf_config
from xllm.layers.rotary import inverse_frequencies
from xllm.models.spec import DecoderSpec
from xllm.protocol import NewRequestData, SamplingParams, StepPlan
from xllm.worker.model_runner import ModelRunner
from xllm_tools import make_model

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)


def prefill_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    """Run one prefill step and return the last position's logits."""
    blocks = list(range(-(-len(prompt) // runner.block_size)))
    plan = StepPlan(1, [NewRequestData("r", prompt, blocks, GREEDY)], {}, ["r"], [len(prompt)], [0], [])
    req_ids, logits = runner.step_logits(plan)
    assert req_ids == ["r"]
    return logits[0]


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_logits_match_transformers(preset, shards, tmp_path):
    path = make_model(preset, tmp_path / "m", shards=shards)
    if shards > 1:
        assert len(list(path.glob("*.safetensors"))) == shards
    runner = ModelRunner(ModelConfig(str(path)), CacheConfig(block_size=4, num_blocks=64), read_hf_config(path))
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46]
    ours = prefill_logits(runner, prompt)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_bfloat16_weights_load_and_track_float32(tmp_path):
    path = make_model("tiny-llama", tmp_path / "m")
    hf = read_hf_config(path)
    prompt = list(range(5, 40))
    fp32 = prefill_logits(ModelRunner(ModelConfig(str(path)), CacheConfig(4, 64), hf), prompt)
    bf16_runner = ModelRunner(ModelConfig(str(path), dtype="bfloat16"), CacheConfig(4, 64), hf)
    assert bf16_runner.model.embed_tokens.weight.dtype == torch.bfloat16
    bf16 = prefill_logits(bf16_runner, prompt)
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.99


@pytest.mark.parametrize("params", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 512},
])
def test_rope_frequencies_match_transformers(params):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048,
                      rope_parameters=params)
    ours, scale = inverse_frequencies(DecoderSpec.from_hf({**cfg.to_dict(), "architectures": ["x"]}).rope,
                                      16, 2048)
    fn = ROPE_INIT_FUNCTIONS[params["rope_type"]] if params["rope_type"] != "default" else None
    if fn is None:
        ref = 1.0 / (params["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
        ref_scale = 1.0
    else:
        ref, ref_scale = fn(cfg, "cpu")
    torch.testing.assert_close(ours, ref.float())
    assert scale == pytest.approx(ref_scale)


def test_unsupported_architecture_is_named():
    from xllm.models.registry import model_class

    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel"):
        model_class("GPT2LMHeadModel")


@pytest.mark.slow
def test_bf16_decode_graph_matches_the_eager_decode(tmp_path):
    """bf16 weights are packed for oneDNN, and a compiled decode graph reaches each layer's
    packed weight by its handle: the graph's logits must be the eager forward's."""
    path = make_model("tiny-llama", tmp_path / "m")
    runner = ModelRunner(ModelConfig(str(path), dtype="bfloat16"), CacheConfig(16, 32), read_hf_config(path),
                         graph_buckets=[4])
    runner.graphs.warm_up(progress=False)
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        packed = [m.packed for m in runner.model.modules() if getattr(m, "packed", None) is not None]
        assert packed and all(p.handle is not None for p in packed)
    prompts = [list(range(5, 25)), list(range(40, 47)), list(range(60, 93))]
    new = [NewRequestData(f"r{i}", p, [i * 4 + b for b in range(4)], GREEDY, len(p)) for i, p in enumerate(prompts)]
    ids = [n.req_id for n in new]
    runner.execute(StepPlan(1, new, {}, ids, [len(p) for p in prompts], [0, 0, 0], []))  # eager prefill
    decode = StepPlan(2, [], {}, ids, [1, 1, 1], [len(p) for p in prompts], [])
    _, graph_logits = runner.step_logits(decode)
    assert runner.graphs.runs[4] == 1
    graphs, runner.graphs = runner.graphs, None  # the same step again, eagerly (same K/V written)
    _, eager_logits = runner.step_logits(decode)
    runner.graphs = graphs
    # bf16: the graph keeps fp32 inside fused kernels where eager rounds after every op,
    # so logits differ by a few bf16 steps; a wrong or missing weight would not be close
    cos = torch.nn.functional.cosine_similarity(graph_logits.float(), eager_logits.float(), dim=-1)
    assert cos.min() > 0.999, cos
    assert (graph_logits - eager_logits).abs().max() <= 0.05 * eager_logits.abs().max()
