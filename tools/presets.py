"""The model shapes the model maker can build, by name.

A preset is plain data: the transformers `model_type` and config fields, the tokenizer
family, the saved dtype and the init scale. Configs use transformers 5 names
(`rope_parameters` holds `rope_theta` and any scaling; `dtype`, not `torch_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class Preset:
    """One buildable model: architecture, config fields, tokenizer family, dtype, init."""

    name: str
    model_type: str  # transformers config model_type: "llama", "qwen2", "qwen3"
    architecture: str  # e.g. "LlamaForCausalLM"
    tokenizer_family: str  # a key of tokenizer.FAMILIES
    dtype: str  # dtype of the saved weights: "float32" or "bfloat16"
    init_std: float  # std of the normal init of matrices and embeddings
    wide_init: bool  # tiny models: also jitter norm weights and give biases std 0.1
    config: Mapping[str, Any] = field(default_factory=dict)  # transformers config kwargs

    def config_kwargs(self) -> dict[str, Any]:
        """A fresh, mutable copy of the config fields (nested dicts copied too)."""
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in self.config.items()}


_TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,  # factor * original == max_position_embeddings
}
_LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
_YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 512,  # factor * original == max_position_embeddings
}


def _tiny(name: str, model_type: str, architecture: str, family: str, **config: Any) -> Preset:
    """A tiny fp32 test model with wide init; `config` overrides the shared tiny shape."""
    return Preset(
        name=name,
        model_type=model_type,
        architecture=architecture,
        tokenizer_family=family,
        dtype="float32",
        init_std=0.2,
        wide_init=True,
        config=MappingProxyType({**_TINY, **config}),
    )


_PRESET_LIST = [
    _tiny("tiny-llama", "llama", "LlamaForCausalLM", "llama3", tie_word_embeddings=False),
    # Qwen2's q/k/v projections always carry a bias (there is no config switch).
    _tiny("tiny-qwen2", "qwen2", "Qwen2ForCausalLM", "chatml", tie_word_embeddings=True),
    # Qwen3 has per-head RMSNorm on q and k, and no attention bias.
    _tiny("tiny-qwen3", "qwen3", "Qwen3ForCausalLM", "chatml", tie_word_embeddings=False),
    _tiny(
        "tiny-llama-rope-llama3", "llama", "LlamaForCausalLM", "llama3",
        tie_word_embeddings=False, rope_parameters=_LLAMA3_ROPE,
    ),
    _tiny(
        "tiny-llama-rope-linear", "llama", "LlamaForCausalLM", "llama3",
        tie_word_embeddings=False, rope_parameters=_LINEAR_ROPE,
    ),
    _tiny(
        "tiny-qwen2-rope-yarn", "qwen2", "Qwen2ForCausalLM", "chatml",
        tie_word_embeddings=True, rope_parameters=_YARN_ROPE,
    ),
    # One multi-token-prediction layer after the decoder, DeepSeek-V3 style (the model maker
    # writes its weights as layer num_hidden_layers; transformers loads the rest and skips it).
    _tiny("tiny-llama-mtp", "llama", "LlamaForCausalLM", "llama3", tie_word_embeddings=False,
          num_nextn_predict_layers=1),
    Preset(
        name="llama-110m",
        model_type="llama",
        architecture="LlamaForCausalLM",
        tokenizer_family="llama3",
        dtype="bfloat16",
        init_std=0.02,
        wide_init=False,
        config=MappingProxyType({
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "num_key_value_heads": 4,
            "head_dim": 64,
            "intermediate_size": 2048,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "tie_word_embeddings": False,
        }),
    ),
    # The published Qwen2.5-0.5B(-Instruct) config.json, in transformers 5 names.
    Preset(
        name="qwen2.5-0.5b-shape",
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        tokenizer_family="chatml",
        dtype="bfloat16",
        init_std=0.02,
        wide_init=False,
        config=MappingProxyType({
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "intermediate_size": 4864,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "max_window_layers": 21,
            "hidden_act": "silu",
        }),
    ),
]

def _variant(base: Preset, name: str, **config: Any) -> Preset:
    """``base`` under another name with some config fields changed."""
    return replace(base, name=name, config=MappingProxyType({**base.config, **config}))


# llama-110m without GQA (as many KV heads as heads): the shape of the llama.cpp comparison.
_PRESET_LIST.append(_variant(next(p for p in _PRESET_LIST if p.name == "llama-110m"), "llama-110m-mha",
                             num_key_value_heads=12))

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _PRESET_LIST})


def get_preset(name: str) -> Preset:
    """The preset called `name`; raises KeyError listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
