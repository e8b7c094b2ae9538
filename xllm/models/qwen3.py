"""Qwen3: the Llama decoder with RMSNorm on each query and key head (set in ``DecoderSpec``)."""

from .llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
