"""A model's shape, read from its config.json into one small frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass


def rope_parameters(hf: dict) -> dict:
    """The RoPE settings of a config.json, old (``rope_scaling``) or new (``rope_parameters``)."""
    params = dict(hf.get("rope_parameters") or {})
    old = hf.get("rope_scaling") or {}
    params.update({k: v for k, v in old.items() if k not in params})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


@dataclass(frozen=True)
class DecoderSpec:
    """The numbers a decoder-only transformer is built from."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    rope: dict  # rope_type, rope_theta and the variant's parameters
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    num_mtp_layers: int = 0  # multi-token-prediction layers after the decoder (DeepSeek-V3 style)

    @classmethod
    def from_hf(cls, hf: dict) -> "DecoderSpec":
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json names no architecture")
        heads = hf["num_attention_heads"]
        model_type = hf.get("model_type", "")
        attention_bias = bool(hf.get("attention_bias", False))
        if hf.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"activation {hf['hidden_act']!r} is not supported")
        return cls(
            architecture=archs[0],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=rope_parameters(hf),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            num_mtp_layers=int(hf.get("num_nextn_predict_layers") or 0),
        )
