"""The multi-token-prediction layer (xllm/models/mtp.py) against a plain rendering of its
formula on transformers' own pieces: the main model's final hidden states, its embedding
and head, RMSNorm and a Llama decoder layer loaded with the checkpoint's MTP weights.
transformers has no MTP forward itself (it loads such a checkpoint and skips the layer)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from xllm.config import read_hf_config
from xllm.models.llama import LlamaForCausalLM
from xllm.models.loader import iter_weights
from xllm.models.mtp import MultiTokenPredictor
from xllm.models.spec import DecoderSpec
from xllm.worker.kv_cache import allocate_kv_cache
from xllm.worker.step_inputs import step_inputs
from xllm_tools import make_model


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.inference_mode()
def test_mtp_layer_equals_its_formula_on_transformers_pieces(tmp_path):
    path = make_model("tiny-llama-mtp", tmp_path / "m")
    spec = DecoderSpec.from_hf(read_hf_config(path))
    assert spec.num_mtp_layers == 1
    main = LlamaForCausalLM(spec)
    main.load_weights(iter_weights(path, torch.float32))  # the MTP layer's tensors are left alone
    mtp = MultiTokenPredictor(spec, main)
    mtp.load_weights(iter_weights(path, torch.float32))
    allocate_kv_cache(main.attention_layers(), 4, 16, torch.float32)
    allocate_kv_cache(mtp.attention_layers(), 4, 16, torch.float32)
    tokens = [5, 91, 300, 7, 44, 812, 3, 3, 650, 21, 99, 17]
    t = len(tokens)
    inp = step_inputs(["r"], [tokens], [[0, 1]], [t], [0], 16)
    hidden = main(inp.input_ids, inp.positions, inp.meta)  # (T, H), after the final norm
    shifted = step_inputs(["r"], [tokens[1:]], [[0, 1]], [t - 1], [0], 16)
    ours = mtp.compute_logits(mtp(shifted.input_ids, shifted.positions, hidden[:-1], shifted.meta))

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([tokens])
    hf_hidden = hf(ids, output_hidden_states=True).hidden_states[-1][0]  # after the final norm
    torch.testing.assert_close(hidden, hf_hidden, atol=1e-4, rtol=1e-4)
    w = {k.split(".", 3)[3]: v for k, v in load_file(str(path / "model.safetensors")).items()
         if k.startswith(f"model.layers.{spec.num_layers}.")}
    eps = spec.rms_norm_eps
    e = _rms(hf.model.embed_tokens(ids[0, 1:]), w["enorm.weight"], eps)
    x = torch.cat([e, _rms(hf_hidden[:-1], w["hnorm.weight"], eps)], dim=-1) @ w["eh_proj.weight"].T
    layer = LlamaDecoderLayer(hf.config, layer_idx=0).eval()
    layer.load_state_dict({k: v for k, v in w.items() if not k.startswith(("enorm", "hnorm", "eh_proj", "shared_head"))})
    pos = torch.arange(t - 1).unsqueeze(0)
    rope = LlamaRotaryEmbedding(hf.config)(x.unsqueeze(0), pos)
    causal = torch.full((t - 1, t - 1), float("-inf")).triu(1)[None, None]
    y = layer(x.unsqueeze(0), attention_mask=causal, position_ids=pos, position_embeddings=rope)
    y = y[0] if isinstance(y, tuple) else y
    ref = hf.lm_head(_rms(y[0], w["shared_head.norm.weight"], eps))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
