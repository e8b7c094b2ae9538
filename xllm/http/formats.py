"""OpenAI response bodies and stream chunks, built from the SDK's ``RequestDelta``s.

A format keeps one ``ChoiceState`` per choice. ``feed`` folds a delta into its state and
returns that choice's part of a stream chunk; ``response`` is the whole non-streaming
body. Completions and chat differ only in how a choice and its logprobs look.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..chat.reasoning import ReasoningParser, ReasoningStream
from ..chat.tool_parsers import ToolCallStream, ToolParser, message_fields
from ..protocol import RequestDelta, TokenLogprob
from .params import Choice


@dataclass
class ChoiceState:
    """What one choice produced so far."""

    prompt_index: int
    prefix: str = ""  # text put before the output (completions' echo), sent with the first chunk
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # None until the engine sends any
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    offset: int = 0  # characters before the next token (completions' text_offset)
    started: bool = False  # the first delta of this choice was fed (the prefix went with it)


class Format:
    """The parts common to completions and chat: ids, states, usage, chunk envelopes."""

    id_prefix = ""
    chunk_object = ""

    def __init__(self, model: str, choices: list[Choice], top_k: int | None,
                 include_usage: bool = False, token_ids: bool = False) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.token_ids = token_ids  # vLLM's return_token_ids: choices carry their token ids
        self.include_usage = include_usage  # stream chunks carry "usage" (null but in the last)
        self.created = int(time.time())
        self.model = model
        self.top_k = top_k  # logprob alternatives per token; None: no logprobs asked for
        self.states = {c.index: ChoiceState(c.prompt_index) for c in choices}

    def feed(self, index: int, delta: RequestDelta) -> dict | None:
        """Fold a delta into its choice; returns the choice's chunk part (None: nothing new)."""
        s = self.states[index]
        s.num_prompt_tokens = delta.num_prompt_tokens or s.num_prompt_tokens
        s.num_output_tokens = delta.num_output_tokens
        s.finish_reason = delta.finish_reason
        text = delta.text
        if not s.started:
            text = s.prefix + text
        s.text.append(text)
        s.token_ids += delta.token_ids
        new_lp = self._logprobs(s, delta.logprobs or [])
        if delta.logprobs is not None:
            s.logprobs = (s.logprobs or []) + delta.logprobs
        s.started = True
        if not text and delta.finish_reason is None and not delta.logprobs and not (
                self.token_ids and delta.token_ids):
            return None
        part = self.chunk_choice(index, text, new_lp if delta.logprobs is not None else None,
                                 delta.finish_reason)
        if self.token_ids:
            part["token_ids"] = list(delta.token_ids)
        return part

    def usage(self) -> dict:
        """Token counts: each prompt once, every choice's output."""
        prompts: dict[int, int] = {}
        for s in self.states.values():
            prompts[s.prompt_index] = max(prompts.get(s.prompt_index, 0), s.num_prompt_tokens)
        prompt = sum(prompts.values())
        completion = sum(s.num_output_tokens for s in self.states.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def chunk(self, parts: list[dict], usage: dict | None = None) -> dict:
        """A stream chunk."""
        body = {"id": self.id, "object": self.chunk_object, "created": self.created,
                "model": self.model, "choices": parts}
        if self.include_usage:
            body["usage"] = usage
        return body

    def head(self) -> list[dict]:
        """Chunks sent before any output (chat's role announcement)."""
        return []

    # -- per API ----------------------------------------------------------------------------
    def chunk_choice(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        raise NotImplementedError

    def _logprobs(self, s: ChoiceState, entries: list[TokenLogprob]) -> dict:
        raise NotImplementedError

    def response(self) -> dict:
        raise NotImplementedError

    def _with_ids(self, choice: dict, s: ChoiceState) -> dict:
        if self.token_ids:
            choice["token_ids"] = s.token_ids
        return choice


class CompletionFormat(Format):
    """``/v1/completions`` bodies; logprobs as tokens / token_logprobs / top_logprobs / offsets."""

    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def __init__(self, model: str, choices: list[Choice], top_k: int | None,
                 include_usage: bool = False, echo: list[str] | None = None, token_ids: bool = False) -> None:
        super().__init__(model, choices, top_k, include_usage, token_ids)
        for s in self.states.values():
            s.prefix = echo[s.prompt_index] if echo else ""
            s.offset = len(s.prefix)

    def chunk_choice(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _logprobs(self, s: ChoiceState, entries: list[TokenLogprob]) -> dict:
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            top = {text: lp for _, text, lp in e.top[: self.top_k or 0]}
            top.setdefault(e.token, e.logprob)
            out["tokens"].append(e.token)
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(s.offset)
            s.offset += len(e.token)
        return out

    def response(self) -> dict:
        choices = []
        for index, s in sorted(self.states.items()):
            lp = None
            if s.logprobs is not None:
                lp = self._logprobs(ChoiceState(0, offset=len(s.prefix)), s.logprobs)
            choices.append(self._with_ids({"index": index, "text": "".join(s.text), "logprobs": lp,
                                           "finish_reason": s.finish_reason}, s))
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage()}


class ReplyReader:
    """Reads one chat choice's text as a client expects it: the reasoning part split off
    (``reasoning_content``), tool calls parsed out (``tool_calls``), the rest ``content``."""

    def __init__(self, tools: ToolParser | None, reasoning: ReasoningParser | None) -> None:
        self.tools, self.reasoning = tools, reasoning
        self._tool_stream = ToolCallStream(tools) if tools else None
        self._reasoning_stream = ReasoningStream(reasoning) if reasoning else None

    def feed(self, text: str, final: bool) -> dict:
        """The stream delta's fields for ``text`` (``final``: the choice ended)."""
        delta: dict = {}
        content = text
        if self._reasoning_stream is not None:
            thought, content = self._reasoning_stream.feed(text, final)
            if thought:
                delta["reasoning_content"] = thought
        if self._tool_stream is not None:
            delta.update(self._tool_stream.feed(content, final))
        elif content:
            delta["content"] = content
        return delta

    @property
    def made_calls(self) -> bool:
        return self._tool_stream is not None and self._tool_stream.num_calls > 0

    def message(self, text: str) -> dict:
        """The non-streaming message's fields for the whole text."""
        out: dict = {}
        if self.reasoning is not None:
            thought, text = self.reasoning.split(text, True)
            out["reasoning_content"] = thought or None
        if self.tools is not None:
            out.update(message_fields(self.tools, text))
        else:
            out["content"] = text
        return out


class ChatFormat(Format):
    """``/v1/chat/completions`` bodies; logprobs as ``{"content": [{token, logprob, bytes,
    top_logprobs}]}``; with tool or reasoning parsers, each choice's text goes through a
    ``ReplyReader``, and a reply with tool calls finishes with ``"tool_calls"``."""

    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def __init__(self, model: str, choices: list[Choice], top_k: int | None, include_usage: bool = False,
                 token_ids: bool = False, tools: ToolParser | None = None,
                 reasoning: ReasoningParser | None = None) -> None:
        super().__init__(model, choices, top_k, include_usage, token_ids)
        self.readers = ({i: ReplyReader(tools, reasoning) for i in self.states}
                        if tools is not None or reasoning is not None else None)

    def head(self) -> list[dict]:
        parts = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in sorted(self.states)]
        return [self.chunk(parts)]

    def chunk_choice(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        if self.readers is None:
            delta = {"content": text} if text else {}
        else:
            reader = self.readers[index]
            delta = reader.feed(text, reason is not None)
            if reason == "stop" and reader.made_calls:
                reason = "tool_calls"
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def _logprobs(self, s: ChoiceState, entries: list[TokenLogprob]) -> dict:
        k = self.top_k or 0
        return {"content": [
            {"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                              for _, t, lp in e.top[:k]]}
            for e in entries]}

    def response(self) -> dict:
        choices = []
        for index, s in sorted(self.states.items()):
            lp = self._logprobs(s, s.logprobs) if s.logprobs is not None else None
            text, reason = "".join(s.text), s.finish_reason
            message = {"role": "assistant", "content": text}
            if self.readers is not None:
                message.update(self.readers[index].message(text))
                if reason == "stop" and message.get("tool_calls"):
                    reason = "tool_calls"
            choices.append(self._with_ids({"index": index, "message": message, "logprobs": lp,
                                           "finish_reason": reason}, s))
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage()}
