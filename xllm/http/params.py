"""Turn an OpenAI request body into SDK requests: one per output choice.

``n`` choices of one prompt are ``n`` SDK requests; with a seed, choice ``i`` gets
``seed + i`` so the choices differ and still repeat. Completions may carry several
prompts; choice ``p * n + i`` is the ``i``-th sample of prompt ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ApiError
from .structured import structured_output
from .tools import ToolPlan
from .schemas import ChatMessageIn, ChatRequest, CompletionRequest, _Sampling

ROLES = {"system", "user", "assistant", "tool", "developer"}
MAX_CHOICES = 256  # prompts * n per HTTP request at most


@dataclass
class Choice:
    """One SDK request behind one choice of the response."""

    index: int  # the choice's index in the response
    prompt_index: int  # which prompt of the request it samples
    kwargs: dict  # keyword arguments of ``AsyncClient.stream``


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, each text or token ids; 400 when the shape is mixed or empty."""
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise ApiError(400, "prompt must not be empty", "invalid_value", "prompt")
    if all(isinstance(x, int) for x in p):
        return [list(p)]
    if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
        if any(isinstance(x, list) and not x for x in p):
            raise ApiError(400, "a token-id prompt must not be empty", "invalid_value", "prompt")
        return list(p)
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids, "
                        "or a list of token-id lists", "invalid_type", "prompt")


def completion_choices(req: CompletionRequest) -> list[Choice]:
    """The SDK requests of a completions request."""
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, "best_of other than n is not supported", "unsupported", "best_of")
    if req.echo and req.logprobs is not None:
        raise ApiError(400, "echo together with logprobs is not supported", "unsupported", "echo")
    prompts = completion_prompts(req)
    sampling = _sampling(req, req.max_tokens, req.logprobs)
    inputs = [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
    return _fan_out(req, inputs, sampling)


def chat_choices(req: ChatRequest, plan: ToolPlan | None = None) -> list[Choice]:
    """The SDK requests of a chat request (``plan``: how it uses its tools)."""
    plan = plan or ToolPlan()
    k = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    sampling = _sampling(req, max_tokens, k)
    if plan.structured is not None:
        if "structured" in sampling:
            raise ApiError(400, 'tool_choice "required" or a named function cannot be combined with '
                                "another structured output constraint", "invalid_value", "tool_choice")
        sampling["structured"] = plan.structured
    given = {"messages": chat_messages(req.messages)}
    if plan.tools:
        given["tools"] = plan.tools
    return _fan_out(req, [given], sampling)


def chat_messages(messages: list[ChatMessageIn]) -> list[dict]:
    """Messages as the SDK takes them (role, content text); 400 for what cannot be served."""
    if not messages:
        raise ApiError(400, "messages must not be empty", "invalid_value", "messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ApiError(400, f"unknown role {m.role!r}; use one of {sorted(ROLES)}",
                           "invalid_value", f"messages[{i}].role")
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    what = "image" if "image" in part.type else repr(part.type)
                    raise ApiError(400, f"{what} content parts are not supported (only text; images "
                                        "come with multimodal models)", "unsupported",
                                   f"messages[{i}].content[{j}]")
            content = "\n".join(part.text for part in m.content)
        else:
            content = m.content or ""
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            if m.role != "assistant":
                raise ApiError(400, "only assistant messages carry tool_calls", "invalid_value",
                               f"messages[{i}].tool_calls")
            msg["tool_calls"] = [{"id": c.id, "type": c.type,
                                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                 for c in m.tool_calls]
        if m.role == "tool":
            if not m.tool_call_id:
                raise ApiError(400, "a tool message needs the tool_call_id it answers", "invalid_value",
                               f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None and m.role == "tool":
            msg["name"] = m.name
        out.append(msg)
    return out


def _fan_out(req: _Sampling, inputs: list[dict], sampling: dict) -> list[Choice]:
    if len(inputs) * req.n > MAX_CHOICES:
        raise ApiError(400, f"prompts x n must be at most {MAX_CHOICES}", "invalid_value", "n")
    choices = []
    for p, given in enumerate(inputs):
        for i in range(req.n):
            kw = {**given, **sampling, "priority": req.priority, "offline": req.offline}
            if req.seed is not None:
                kw["seed"] = (req.seed + i) % 2**63
            choices.append(Choice(p * req.n + i, p, kw))
    return choices


def _sampling(req: _Sampling, max_tokens: int | None, logprobs: int | None) -> dict:
    """``SamplingParams`` keywords; ``None`` values are left out (the engine's defaults).

    NOTE: only what is particular to HTTP is checked here (logit_bias keys are strings,
    top_k -1 means all); ranges and the vocabulary are checked once, by the frontend,
    whose errors name the field.
    """
    top_k = req.top_k
    if top_k is not None and top_k < 0:
        if top_k != -1:
            raise ApiError(400, "top_k must be -1 or 0 (all tokens) or positive", "invalid_value", "top_k")
        top_k = 0
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r}", "invalid_value",
                           "logit_bias") from None
    kw = dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=top_k,
              min_p=req.min_p, seed=req.seed, stop=[req.stop] if isinstance(req.stop, str) else req.stop,
              stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
              min_tokens=req.min_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
              repetition_penalty=req.repetition_penalty, logit_bias=bias, logprobs=logprobs,
              structured=structured_output(req))
    return {k: v for k, v in kw.items() if v is not None}
