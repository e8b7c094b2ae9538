"""The offline API, in vLLM's shape::

    from xllm import LLM, SamplingParams

    with LLM("preset:smollm2-135m-instruct", dtype="bfloat16") as llm:
        outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
        print(outs[0].outputs[0].text)

``LLM`` starts the same multi-process deployment ``xllm-launch`` starts (engine keyword
arguments are its flags: ``tp=2`` is ``--tp 2``, ``enforce_eager=True`` is
``--enforce-eager``; vLLM's ``tensor_parallel_size`` is accepted for ``tp``), sends every
prompt at once so the engine batches them, and returns the outputs in prompt order. It
stops the deployment on ``shutdown()``, on leaving a ``with`` block (also by an exception)
and at interpreter exit; the launcher also dies with this process if it is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .protocol import SamplingParams

# vLLM's names for flags that xllm spells differently
_ALIASES = {"tensor_parallel_size": "tp"}


@dataclass
class CompletionOutput:
    """One generated sequence of a request (vLLM's ``CompletionOutput``)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    """A finished request (vLLM's ``RequestOutput``): the prompt and its completions."""

    request_id: str
    prompt: str | None  # None when the prompt was token ids or a conversation
    prompt_token_ids: list[int] | None  # given ids, else None (the count is num_prompt_tokens)
    num_prompt_tokens: int
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = True
    messages: list[dict] | None = field(default=None, repr=False)  # the conversation, for chat()


def engine_flags(engine_args: dict[str, Any]) -> list[str]:
    """Keyword arguments as ``xllm-launch`` flags, checked by the launcher's own parser."""
    from .deploy.launcher import build_parser

    flags: list[str] = []
    for name, value in engine_args.items():
        flag = "--" + _ALIASES.get(name, name).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        else:
            flags += [flag, str(value)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(["--model", "x", *flags])
    except SystemExit:
        reason = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "invalid"
        raise ValueError(f"bad engine argument: {reason.split('error: ', 1)[-1]}") from None
    return flags


class LLM:
    """A deployment owned by this object, used like vLLM's ``LLM``.

    ``model``: a Hugging Face directory, a GGUF file, or ``preset:NAME``. ``engine_args``:
    ``xllm-launch`` flags as keywords. ``startup_timeout``: seconds to wait for ready.
    """

    def __init__(self, model: str | Path, *, startup_timeout: float = 600.0, **engine_args: Any) -> None:
        from .deploy.harness import launch
        from .sdk import Client

        flags = engine_flags(engine_args)
        self._tmp = tempfile.TemporaryDirectory(prefix="xllm-llm-")
        self._launch = launch(model, Path(self._tmp.name), *flags, timeout=startup_timeout)
        self._client = None
        try:
            self._dep = self._launch.__enter__()
            self._client = Client(self._dep.address)
        except BaseException:
            self.shutdown()
            raise
        self.pids: dict[str, int] = dict(self._dep.pids)  # actor name -> pid, while it runs
        atexit.register(self.shutdown)

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | Sequence[dict],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (text, token ids, or ``{"prompt_token_ids": [...]}``); the
        outputs come back in prompt order. One ``SamplingParams`` for all, or one each."""
        items = _as_list(prompts)
        requests = []
        for p in items:
            if isinstance(p, str):
                requests.append({"prompt": p})
            elif isinstance(p, dict):
                requests.append({"prompt": p.get("prompt"), "prompt_token_ids": p.get("prompt_token_ids")})
            else:
                requests.append({"prompt_token_ids": [int(t) for t in p]})
        return self._run(requests, sampling_params, use_tqdm, "Generating")

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or several,
        each through the model's chat template; outputs in order."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run([{"messages": list(c)} for c in convs], sampling_params, use_tqdm, "Chatting")

    def _run(self, requests: list[dict], params, use_tqdm: bool, what: str) -> list[RequestOutput]:
        if self._client is None:
            raise RuntimeError("this LLM was shut down")
        per = _params_for(params, len(requests))
        calls = [{**r, "params": p} for r, p in zip(requests, per)]
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(calls), desc=what, unit="req")
        try:
            done = self._client.run_many(calls, on_done=(lambda _: bar.update(1)) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        return [_output(r, c) for r, c in zip(requests, done)]

    # -- lifetime -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the deployment and every process it started (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        launch, self._launch = getattr(self, "_launch", None), None
        if launch is not None:
            with contextlib.suppress(Exception):
                launch.__exit__(None, None, None)
        tmp, self._tmp = getattr(self, "_tmp", None), None
        if tmp is not None:
            tmp.cleanup()
        atexit.unregister(self.shutdown)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], int):  # one prompt as token ids
        return [prompts]
    return prompts


def _params_for(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
    return params


def _output(request: dict, c) -> RequestOutput:
    return RequestOutput(
        request_id=c.req_id, prompt=request.get("prompt"), prompt_token_ids=request.get("prompt_token_ids"),
        num_prompt_tokens=c.num_prompt_tokens, num_cached_tokens=c.num_cached_tokens,
        outputs=[CompletionOutput(0, c.text, list(c.token_ids), c.finish_reason)],
        messages=request.get("messages"))
