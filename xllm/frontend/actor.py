"""The frontend actor: clients' door to the engine.

It accepts SDK connections (ROUTER), validates and tokenizes requests (chat templates
included), hands them to the scheduler, and turns each ``TokenBatch`` (one per engine
step) into one ``RequestOutputs`` per client with the new text of each request. Stop
strings end a request here: the frontend aborts it in the scheduler.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from ..bus.actor import Actor
from ..bus.codec import DecodeError
from ..config import EngineConfig
from ..protocol import (
    AbortRequest, ChatMessage, ClientMessage, ControlCall, ControlReply, ErrorReply, FrontendInput,
    GenerateRequest, RequestDelta, RequestOutputs, RequestRejected, TokenBatch, TokenizedRequest,
    TokenLogprob,
)
from .detokenizer import Detokenizer
from .tokenizer import ModelTokenizer

log = logging.getLogger(__name__)

FORWARDED_CALLS = ("stats", "health", "reset_prefix_cache", "check_integrity", "kv_events")


@dataclass
class Stream:
    """One client request in flight."""

    client: bytes  # ROUTER identity of the client
    client_req_id: str
    detok: Detokenizer
    num_prompt_tokens: int
    stream: bool
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # kept when not streaming
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # kept when not streaming
    queue_time: float = 0.0
    stopped: bool = False  # a stop string matched; the scheduler's abort is on its way


class FrontendActor(Actor):
    """Tokenizer, detokenizer and per-client streams of one deployment."""

    def __init__(self, cfg: EngineConfig) -> None:
        super().__init__("frontend", cfg.addresses.launcher)
        self.cfg = cfg
        self.streams: dict[str, Stream] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        self._ids = itertools.count()
        self._calls = itertools.count(1)
        self.pending_calls: dict[int, tuple[bytes, int]] = {}

    async def setup(self) -> dict:
        a = self.cfg.addresses
        self.tok = ModelTokenizer.load(self.cfg.model.path)
        self.vocab_size = _vocab_size(self.cfg.model.path)
        self.clients = self.channel(zmq.ROUTER, a.frontend, bind=True, union=ClientMessage)
        self.to_scheduler = self.channel(zmq.PUSH, a.scheduler_in, bind=False)
        self.from_scheduler = self.channel(zmq.PULL, a.frontend_in, bind=True, union=FrontendInput)
        return {"address": a.frontend}

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.clients.sock, zmq.POLLIN)
        poller.register(self.from_scheduler.sock, zmq.POLLIN)
        while True:
            while self.from_scheduler.poll_now():
                try:
                    await self._on_engine(await self.from_scheduler.recv())
                except DecodeError as exc:
                    log.error("rejected a malformed message from the scheduler: %s", exc)
            while self.clients.poll_now():
                client, msg = await self.clients.recv_from()
                await self._on_client(client, msg)
            await poller.poll()

    # -- from clients ---------------------------------------------------------------------
    async def _on_client(self, client: bytes, msg) -> None:
        match msg:
            case DecodeError():
                log.warning("rejected a malformed client message: %s", msg)
                await self.clients.send_to(client, ErrorReply("bad_request", f"malformed message: {msg}"))
            case GenerateRequest():
                try:
                    await self._submit(client, msg)
                except ValueError as exc:
                    await self.clients.send_to(client, ErrorReply("bad_request", str(exc), msg.req_id))
                except Exception as exc:  # noqa: BLE001 - e.g. a chat template that raises
                    log.warning("refused request %s: %r", msg.req_id, exc)
                    await self.clients.send_to(client, ErrorReply(
                        "bad_request", f"{type(exc).__name__}: {exc}", msg.req_id))
            case AbortRequest():
                rid = self.by_client.get((client, msg.req_id))
                if rid is not None:
                    await self.to_scheduler.send(AbortRequest(rid))
            case ControlCall():
                await self._control(client, msg)

    async def _submit(self, client: bytes, req: GenerateRequest) -> None:
        if (client, req.req_id) in self.by_client:
            raise ValueError(f"request id {req.req_id!r} is already in flight")
        ids = self._prompt_ids(req)
        max_len = self.cfg.model.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {max_len} "
                             "and at least one must be left for the output")
        sp = req.sampling
        sp.validate()
        bad = [t for t in [*sp.logit_bias, *sp.stop_token_ids] if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} in logit_bias/stop_token_ids is outside the vocabulary")
        if req.sampling.max_tokens is not None and len(ids) + sp.max_tokens > max_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) exceeds "
                             f"the model's context of {max_len}")
        resolved = sp.resolve(self.tok.sampling_defaults, max_len - len(ids))
        rid = f"{next(self._ids)}"
        self.streams[rid] = Stream(client, req.req_id, Detokenizer(self.tok.backend, sp.stop,
                                   sp.include_stop_str_in_output), len(ids), req.stream)
        self.by_client[(client, req.req_id)] = rid
        eos = [] if sp.ignore_eos else self.tok.eos_token_ids
        await self.to_scheduler.send(TokenizedRequest(rid, ids, resolved, eos, time.time(),
                                                      req.priority, req.offline))

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids or messages")
        if req.prompt is not None:
            ids = self.tok.encode(req.prompt, req.add_special_tokens)
        elif req.messages is not None:
            if not req.messages:
                raise ValueError("messages is empty")
            ids = self.tok.apply_chat(req.messages)
        else:
            ids = list(req.prompt_token_ids)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    async def _control(self, client: bytes, call: ControlCall) -> None:
        if call.method == "model_info":
            info = {"name": self.cfg.model.served_name, "max_model_len": self.cfg.model.max_model_len,
                    "vocab_size": self.vocab_size, "num_blocks": self.cfg.cache.num_blocks}
            await self.clients.send_to(client, ControlReply(call.call_id, True, info))
        elif call.method in ("tokenize", "detokenize"):
            try:
                result = self._tokenize(call)
                reply = ControlReply(call.call_id, True, result)
            except (ValueError, TypeError, KeyError) as exc:
                reply = ControlReply(call.call_id, False, error=f"bad_request: {exc}")
            await self.clients.send_to(client, reply)
        elif call.method in FORWARDED_CALLS:
            own = next(self._calls)
            self.pending_calls[own] = (client, call.call_id)
            await self.to_scheduler.send(ControlCall(own, call.method, call.args))
        else:
            await self.clients.send_to(client, ControlReply(call.call_id, False,
                                                            error=f"unknown method {call.method!r}"))

    def _tokenize(self, call: ControlCall) -> dict:
        """``tokenize``: args prompt or messages -> token ids; ``detokenize``: tokens -> text."""
        args = call.args
        if call.method == "detokenize":
            tokens = args["tokens"]
            if not isinstance(tokens, list) or any(not isinstance(t, int) or not 0 <= t < self.vocab_size
                                                   for t in tokens):
                raise ValueError("tokens must be a list of token ids inside the vocabulary")
            return {"prompt": self.tok.decode(tokens)}
        if "messages" in args:
            msgs = [ChatMessage(**m) for m in args["messages"]]
            ids = self.tok.apply_chat(msgs)
        else:
            if not isinstance(args.get("prompt"), str):
                raise ValueError("prompt must be a string")
            ids = self.tok.encode(args["prompt"], bool(args.get("add_special_tokens", True)))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.cfg.model.max_model_len}

    # -- from the scheduler -----------------------------------------------------------------
    async def _on_engine(self, msg) -> None:
        match msg:
            case TokenBatch():
                await self._on_tokens(msg)
            case RequestRejected():
                stream = self._close(msg.req_id)
                if stream is not None:
                    await self.clients.send_to(stream.client, ErrorReply(
                        msg.code, msg.message, stream.client_req_id))
            case ControlReply():
                client, call_id = self.pending_calls.pop(msg.call_id, (None, 0))
                if client is not None:
                    msg.call_id = call_id
                    await self.clients.send_to(client, msg)

    async def _on_tokens(self, batch: TokenBatch) -> None:
        per_client: dict[bytes, list[RequestDelta]] = {}
        logprobs = batch.logprobs or [None] * len(batch.req_ids)
        for rid, tokens, reason, cached, queue_time, lps in zip(
                batch.req_ids, batch.new_token_ids, batch.finish_reasons, batch.num_cached_tokens,
                batch.queue_times, logprobs):
            stream = self.streams.get(rid)
            if stream is None:
                continue
            if stream.stopped:
                if reason is not None:
                    self._close(rid)
                continue
            text, hit_stop = stream.detok.feed(tokens)
            if hit_stop:
                stream.stopped = True
                reason = "stop"
                await self.to_scheduler.send(AbortRequest(rid))
            elif reason is not None:
                text += stream.detok.flush()
            stream.num_output_tokens += len(tokens)
            stream.num_cached_tokens = cached
            stream.queue_time = queue_time
            delta = self._delta(stream, text, tokens, reason, self._logprobs(lps))
            if reason is not None and not hit_stop:
                self._close(rid)
            if delta is not None:
                per_client.setdefault(stream.client, []).append(delta)
        for client, deltas in per_client.items():
            await self.clients.send_to(client, RequestOutputs(deltas))

    def _delta(self, s: Stream, text: str, tokens: list[int], reason: str | None,
               logprobs: list[TokenLogprob] | None) -> RequestDelta | None:
        if not s.stream:
            s.token_ids.extend(tokens)
            s.text.append(text)
            if logprobs is not None:
                s.logprobs.extend(logprobs)
            if reason is None:
                return None
            text, tokens = "".join(s.text), s.token_ids
            logprobs = s.logprobs if logprobs is not None or s.logprobs else None
        return RequestDelta(s.client_req_id, text, tokens, reason, s.num_prompt_tokens,
                            s.num_output_tokens, s.num_cached_tokens, logprobs, s.queue_time)

    def _logprobs(self, entries) -> list[TokenLogprob] | None:
        if entries is None:
            return None
        piece = self.tok.decode_one
        return [TokenLogprob(tok, piece(tok), lp, [(t, piece(t), v) for t, v in zip(ids, vals)])
                for tok, lp, ids, vals in entries]

    def _close(self, rid: str) -> Stream | None:
        stream = self.streams.pop(rid, None)
        if stream is not None:
            self.by_client.pop((stream.client, stream.client_req_id), None)
        return stream


def _vocab_size(model_dir: str) -> int:
    from ..config import read_hf_config

    return int(read_hf_config(model_dir)["vocab_size"])
