"""The frontend actor: clients' door to the engine.

It accepts SDK connections (ROUTER), validates and tokenizes requests (chat templates
included) and hashes their prompt blocks, hands them to the router (in a one-instance
deployment straight to the instance, ``ActorSpec.direct``), and turns each
``TokenBatch`` (one per engine step, straight from the scheduler that ran it) into one
``RequestOutputs`` per client with the new text of each request. Stop strings end a
request here: the frontend aborts it. Request ids are unique in the deployment (the
frontend's own id and a counter), and each request names this frontend as its route.

NOTE (invariant): nothing a client sends can stop this actor or stall the others'
streams. Every client message is handled under a guard that answers an error; inputs
are bounded by size before any work is spent on them (``requests.RequestChecker``), and
large ones are tokenized on a helper thread so the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from ..bus.actor import Actor
from ..block_hash import block_hashes
from ..bus.codec import DecodeError
from ..deploy.plan import ActorSpec, DeploymentPlan
from ..protocol import (
    AbortRequest, ClientMessage, ControlCall, ControlReply, ErrorReply, FrontendInput, GenerateRequest,
    InstanceLost,
    RequestDelta, RequestOutputs, RequestRejected, TokenBatch, TokenizedRequest,
    TokenLogprob,
)
from .detokenizer import Detokenizer
from .requests import RequestChecker
from .tokenizer import ModelTokenizer

log = logging.getLogger(__name__)

FORWARDED_CALLS = ("stats", "health", "reset_prefix_cache", "check_integrity", "drain")  # answered by the router
INLINE_CHARS = 8192  # inputs up to this size are tokenized on the loop; larger ones on a thread
MAX_RESENDS = 2  # a request whose instances keep dying is ended with an error


@dataclass
class Stream:
    """One client request in flight."""

    client: bytes  # ROUTER identity of the client
    client_req_id: str
    stream: bool
    detok: Detokenizer | None = None  # set once the request is accepted
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # kept when not streaming
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # kept when not streaming
    queue_time: float = 0.0
    submitted: bool = False  # the router has it (else it is still being tokenized)
    request: TokenizedRequest | None = None  # kept until its first output: it may be re-sent
    resent: int = 0  # times it was re-sent because its instance was lost
    aborted: bool = False  # the client aborted it before it reached the scheduler
    stopped: bool = False  # a stop string matched; the scheduler's abort is on its way


class FrontendActor(Actor):
    """Tokenizer, detokenizer and per-client streams of one deployment."""

    def __init__(self, plan: DeploymentPlan, spec: ActorSpec) -> None:
        super().__init__(spec.name, plan.launcher, plan.run_dir, plan.key_dir)
        self.plan = plan
        self.spec = spec
        self.cfg = plan.engine
        self.streams: dict[str, Stream] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        self._ids = itertools.count()
        self.id = f"{spec.name}.{uuid.uuid4().hex[:6]}"  # prefixes its request ids
        self._calls = itertools.count(1)
        self.pending_calls: dict[int, tuple[bytes, int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def setup(self) -> dict:
        plan = self.plan
        self.tok = ModelTokenizer.load(self.cfg.model.path)
        self.check = RequestChecker(self.tok, self.cfg.model.max_model_len, _vocab_size(self.cfg.model.path))
        self.route = plan.frontend_in(self.spec.name)
        self.clients = self.channel(zmq.ROUTER, self.spec.address, bind=True, union=ClientMessage)
        self.to_router = self.channel(zmq.DEALER, plan.router_in(self.spec.router), bind=False,
                                      union=FrontendInput)
        self.from_scheduler = self.channel(zmq.PULL, self.route, bind=True, union=FrontendInput)
        # requests and aborts: to the router, or straight to the only instance
        self.to_engine = (self.channel(zmq.PUSH, plan.scheduler_in(self.spec.direct), bind=False)
                          if self.spec.direct else self.to_router)
        return {"address": self.spec.address}

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.clients.sock, zmq.POLLIN)
        poller.register(self.from_scheduler.sock, zmq.POLLIN)
        poller.register(self.to_router.sock, zmq.POLLIN)
        try:
            while True:
                for ch in (self.from_scheduler, self.to_router):
                    while ch.poll_now():
                        try:
                            await self._on_engine(await ch.recv())
                        except DecodeError as exc:
                            log.error("rejected a malformed message from the engine: %s", exc)
                while self.clients.poll_now():
                    client, msg = await self.clients.recv_from()
                    await self._guarded(client, msg, self._on_client(client, msg))
                await poller.poll()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- sending to clients -----------------------------------------------------------------
    async def _reply(self, client: bytes, msg) -> None:
        """Send to one client; a client that is gone has its requests aborted."""
        if not await self.clients.send_to(client, msg):
            await self._drop_client(client)

    async def _drop_client(self, client: bytes) -> None:
        gone = [rid for (c, _), rid in self.by_client.items() if c == client]
        if gone:
            log.info("a client left with %d requests in flight; aborting them", len(gone))
        for rid in gone:
            await self._abort(rid)
            self._close(rid)

    # -- from clients -----------------------------------------------------------------------
    async def _guarded(self, client: bytes, msg, work) -> None:
        """Run the handling of one client message; whatever goes wrong is that client's
        error reply, never this actor's end."""
        try:
            await work
            return
        except ValueError as exc:  # InvalidParam too: the request's own fault
            text, param = str(exc), getattr(exc, "param", None)
        except Exception as exc:  # noqa: BLE001 - e.g. a chat template that raises
            log.warning("refused a client message (%s): %r", type(msg).__name__, exc)
            text, param = f"{type(exc).__name__}: {exc}", None
        if isinstance(msg, ControlCall):  # the caller waits for the reply to its call id
            await self._reply(client, ControlReply(msg.call_id, False, error=f"bad_request: {text}"))
        else:
            req_id = msg.req_id if isinstance(msg, GenerateRequest) else None
            await self._reply(client, ErrorReply("bad_request", text, req_id, param))

    async def _on_client(self, client: bytes, msg) -> None:
        match msg:
            case DecodeError():
                log.warning("rejected a malformed client message: %s", msg)
                await self._reply(client, ErrorReply("bad_request", f"malformed message: {msg}"))
            case GenerateRequest():
                if self.check.input_chars(msg) <= INLINE_CHARS:
                    await self._submit(client, msg)
                else:  # tokenized on the helper thread; the loop goes on serving
                    task = asyncio.ensure_future(self._guarded(client, msg, self._submit(client, msg)))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            case AbortRequest():
                rid = self.by_client.get((client, msg.req_id))
                if rid is not None:
                    await self._abort(rid)
            case ControlCall():
                await self._control(client, msg)

    async def _abort(self, rid: str) -> None:
        stream = self.streams[rid]
        if stream.submitted:
            await self.to_engine.send(AbortRequest(rid))
        else:
            stream.aborted = True  # it is being tokenized: _submit drops it

    async def _submit(self, client: bytes, req: GenerateRequest) -> None:
        if (client, req.req_id) in self.by_client:
            raise ValueError(f"request id {req.req_id!r} is already in flight")
        self.check.before_tokenizing(req)
        rid = f"{self.id}-{next(self._ids)}"
        stream = Stream(client, req.req_id, req.stream)
        self.streams[rid] = stream
        self.by_client[(client, req.req_id)] = rid
        try:
            if self.check.input_chars(req) <= INLINE_CHARS:
                ids, hashes = self._tokens(req)
            else:
                loop = asyncio.get_running_loop()
                ids, hashes = await loop.run_in_executor(self._pool, self._tokens, req)
            resolved = self.check.sampling(req, ids)
        except BaseException:
            self._close(rid)
            raise
        if stream.aborted:
            self._close(rid)
            await self._reply(client, RequestOutputs([RequestDelta(req.req_id, finish_reason="abort")]))
            return
        sp = req.sampling
        stream.detok = Detokenizer(self.tok.backend, sp.stop, sp.include_stop_str_in_output)
        stream.num_prompt_tokens = len(ids)
        eos = [] if sp.ignore_eos else self.tok.eos_token_ids
        stream.request = TokenizedRequest(rid, ids, resolved, eos, time.time(), req.priority, req.offline,
                                          self.route, hashes, self.cfg.cache.block_size)
        await self.to_engine.send(stream.request)
        stream.submitted = True

    def _tokens(self, req: GenerateRequest) -> tuple[list[int], list[int]]:
        """The prompt's token ids and the hashes of its full blocks (for every prefix cache)."""
        ids = self.check.prompt_ids(req)
        return ids, block_hashes(ids, self.cfg.cache.block_size)

    async def _control(self, client: bytes, call: ControlCall) -> None:
        if call.method == "model_info":
            info = {"name": self.cfg.model.served_name, "max_model_len": self.cfg.model.max_model_len,
                    "vocab_size": self.check.vocab_size, "num_blocks": self.cfg.cache.num_blocks}
            await self._reply(client, ControlReply(call.call_id, True, info))
        elif call.method in ("tokenize", "detokenize"):
            await self._reply(client, ControlReply(call.call_id, True, await self._tokenize(call)))
        elif call.method in FORWARDED_CALLS:
            own = next(self._calls)
            self.pending_calls[own] = (client, call.call_id)
            # NOTE: only drain takes an argument (which instance); nothing else of a client's args is passed inside
            args = {"instance": call.args.get("instance")} if call.method == "drain" else {}
            await self.to_router.send(ControlCall(own, call.method, args))
        else:
            await self._reply(client, ControlReply(call.call_id, False,
                                                   error=f"unknown method {call.method!r}"))

    async def _tokenize(self, call: ControlCall) -> dict:
        """``tokenize``: args prompt or messages -> token ids; ``detokenize``: tokens -> text."""
        if call.method == "detokenize":
            return {"prompt": self.tok.decode(self.check.token_list(call.args.get("tokens")))}
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._pool, self.check.tokenize_call, call.args)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.cfg.model.max_model_len}

    # -- from the scheduler -----------------------------------------------------------------
    async def _on_engine(self, msg) -> None:
        match msg:
            case TokenBatch():
                await self._on_tokens(msg)
            case RequestRejected():
                stream = self._close(msg.req_id)
                if stream is not None:
                    await self._reply(stream.client, ErrorReply(msg.code, msg.message, stream.client_req_id))
            case ControlReply():
                client, call_id = self.pending_calls.pop(msg.call_id, (None, 0))
                if client is not None:
                    msg.call_id = call_id
                    await self._reply(client, msg)
            case InstanceLost():
                for rid in msg.req_ids:
                    await self._on_lost(rid, msg.instance_id)

    async def _on_lost(self, rid: str, instance_id: str) -> None:
        """A request's instance is gone: re-send it if nothing of it was streamed yet,
        else end it with an error (the client has text no other instance can continue)."""
        stream = self.streams.get(rid)
        if stream is None or stream.stopped:
            return
        if stream.num_output_tokens == 0 and stream.request is not None and stream.resent < MAX_RESENDS:
            stream.resent += 1
            log.info("request %s re-sent: its instance %s was lost", rid, instance_id)
            await self.to_engine.send(stream.request)
            return
        delta = self._delta(stream, stream.detok.flush(), [], "error", None)
        delta.error = (f"the instance serving this request ({instance_id}) was lost after "
                       f"{stream.num_output_tokens} output tokens")
        self._close(rid)
        await self._reply(stream.client, RequestOutputs([delta]))

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
            text, hit_stop, tokens, lps = self._detokenize(stream, tokens, lps)
            if hit_stop:
                stream.stopped = True
                reason = "stop"
                await self.to_engine.send(AbortRequest(rid))
            elif reason is not None:
                text += stream.detok.flush()
            stream.num_output_tokens += len(tokens)
            if tokens:
                stream.request = None  # streamed: no longer re-sendable
            stream.num_cached_tokens = cached
            stream.queue_time = queue_time
            delta = self._delta(stream, text, tokens, reason, self._logprobs(lps))
            if reason is not None and not hit_stop:
                self._close(rid)
            if delta is not None:
                per_client.setdefault(stream.client, []).append(delta)
        for client, deltas in per_client.items():
            await self._reply(client, RequestOutputs(deltas))

    @staticmethod
    def _detokenize(stream: Stream, tokens: list[int], lps):
        """(text, stop string hit, tokens, logprobs) of one row. A row may hold several
        tokens (``--stream-interval``): with stop strings they are fed one by one, and the
        tokens after the one that completes a stop string are dropped, as if each had
        come alone."""
        if len(tokens) < 2 or not stream.detok.stop:
            return (*stream.detok.feed(tokens), tokens, lps)
        text = ""
        for i, token in enumerate(tokens):
            piece, hit = stream.detok.feed([token])
            text += piece
            if hit:
                return text, True, tokens[:i + 1], lps[:i + 1] if lps is not None else None
        return text, False, tokens, lps

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
