"""Exceptions the SDK raises, carrying the server's message."""

from __future__ import annotations


class XllmError(Exception):
    """The engine refused or failed a request; ``code`` says why in one word."""

    def __init__(self, code: str, message: str, req_id: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.req_id = req_id
        self.param = param  # the request field at fault, when the server named one


class BadRequestError(XllmError):
    """The request was invalid (the message names the field or limit)."""


class OverloadedError(XllmError):
    """The engine's queue is full; try again later."""


class EngineUnavailableError(XllmError):
    """No answer from the deployment within the timeout, the connection to it was lost, or
    no instance serves (``code`` "timeout", "disconnected" or "unavailable")."""


def error_for(code: str, message: str, req_id: str | None = None, param: str | None = None) -> XllmError:
    cls = {"bad_request": BadRequestError, "overloaded": OverloadedError,
           "unavailable": EngineUnavailableError}.get(code, XllmError)
    return cls(code, message, req_id, param)
