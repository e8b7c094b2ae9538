"""Architecture names (``config.json`` ``architectures[0]``) -> model classes."""

from __future__ import annotations

from torch import nn

from .llama import LlamaForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODELS[architecture]
    except KeyError:
        raise NotImplementedError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(MODELS)}") from None
