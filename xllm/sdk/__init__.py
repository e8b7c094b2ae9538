"""The xllm client SDK: ``AsyncClient`` (asyncio) and ``Client`` (blocking)."""

from ..protocol import ChatMessage, RequestDelta, SamplingParams
from .client import AsyncClient, Completion
from .errors import BadRequestError, EngineUnavailableError, OverloadedError, XllmError
from .sync import Client

__all__ = ["AsyncClient", "Client", "Completion", "RequestDelta", "SamplingParams", "ChatMessage",
           "XllmError", "BadRequestError", "EngineUnavailableError", "OverloadedError"]
