"""HTTP errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every refusal of the shim is an ``ApiError``; the app's exception handler turns it into a
JSON response. SDK errors and msgspec decode errors are mapped here, in one place.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec
from starlette.responses import Response

from ..sdk.errors import XllmError

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
          405: "invalid_request_error",
          408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
          499: "client_closed_request", 500: "internal_error", 503: "service_unavailable"}
T = TypeVar("T")
_AT = re.compile(r"at `\$\.?([^`]*)`")
_FIELD = re.compile(r"field `([^`]*)`")


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict:
        """The ``{"error": {...}}`` object (also used as an SSE error event)."""
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> Response:
        """The JSON response for this error."""
        return Response(msgspec.json.encode(self.body()), status_code=self.status,
                        media_type="application/json")


class ClientGone(Exception):
    """The HTTP client disconnected; its requests were aborted."""


def decode_body(raw: bytes, cls: type[T]) -> T:
    """``raw`` decoded as ``cls``; an ``ApiError`` (400) naming what is wrong otherwise.

    NOTE: the cause is decided from the bytes themselves (is it UTF-8? how deep does it
    nest?), never from the wording of msgspec's message, which changes between releases.
    """
    try:
        return msgspec.json.decode(raw, type=cls)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", "too_deep") from None
    except msgspec.ValidationError as exc:
        param = _param(str(exc))
        raise ApiError(400, f"invalid request body: {exc}", "invalid_type", param or None) from None
    except msgspec.DecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not valid UTF-8", "invalid_encoding") from None
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None


def _param(message: str) -> str | None:
    """The request field a msgspec validation error points at: its path, then the field it names."""
    at, field = _AT.search(message), _FIELD.search(message)
    parts = [p for p in (at.group(1) if at else "", field.group(1) if field else "") if p]
    return ".".join(parts) or None


def from_sdk(exc: XllmError) -> ApiError:
    """An error the engine sent back for one request."""
    if exc.code == "overloaded":
        return ApiError(429, f"the engine is overloaded: {exc.message}", "queue_full")
    if exc.code in ("bad_request", "control_error"):
        # the SDK's prompt_token_ids is the API's prompt (as token ids);
        # the SDK's structured is one of the API's structured output fields; the message names the problem
        param = {"prompt_token_ids": "prompt", "structured": "response_format"}.get(exc.param, exc.param)
        return ApiError(400, exc.message.removeprefix("bad_request: "), "bad_request", param)
    if exc.code == "not_found":
        return ApiError(404, exc.message, "not_found")
    if exc.code in ("timeout", "disconnected", "unavailable"):
        return ApiError(503, exc.message, "engine_unavailable")
    return ApiError(500, exc.message, exc.code)


def timeout_error(seconds: float) -> ApiError:
    """The request ran past its deadline and was aborted."""
    return ApiError(408, f"the request did not finish within {seconds:g} s and was aborted",
                    "request_timeout")
