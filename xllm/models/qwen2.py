"""Qwen2: the Llama decoder with biases on the q/k/v projections (set in ``DecoderSpec``)."""

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
