"""xllm: an actor-model LLM serving engine on a ZeroMQ message bus.

The offline API (``LLM``, ``SamplingParams``) is imported on first use, so the engine's
processes, which import ``xllm.*`` modules, do not pay for it.
"""

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from . import offline

        return getattr(offline, name)
    if name == "SamplingParams":
        from .protocol import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'xllm' has no attribute {name!r}")
