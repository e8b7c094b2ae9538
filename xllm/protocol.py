"""Every message that crosses a process boundary in xllm.

NOTE: this module is the one wire schema of the project. No other module defines a
type that is sent over a socket. Messages are ``msgspec.Struct``s grouped per socket
into tagged unions; each socket has one typed decoder (see ``xllm.bus.codec``) and an
unknown or malformed message fails to decode instead of being guessed at.

Arrays (logprobs, later KV blocks and image features) travel as extra ZeroMQ frames:
a field typed ``numpy.ndarray`` is written as ``[dtype, shape, frame_index]`` in the
struct and its bytes as its own frame, sent and received without a copy.

The module imports nothing from the engine so that every actor and the SDK can use it.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec
import numpy as np

# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


class InvalidParam(ValueError):
    """A request field out of range; ``param`` names it (e.g. ``"temperature"``)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


STRUCTURED_KINDS = ("json", "json_schema", "regex", "lark")


class StructuredOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A constraint on what a request may generate, enforced token by token while sampling
    (the worker masks every token the grammar does not allow)."""

    kind: str  # "json" (any JSON value), "json_schema", "regex" or "lark" (a Lark grammar)
    spec: str = ""  # the JSON schema as JSON text, the regular expression, or the grammar


class SamplingParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """How to pick tokens for one request.

    ``None`` means "the model's default" (its ``generation_config.json``, else neutral).
    The frontend validates the request and resolves every ``None`` (``resolve``) before
    the request reaches the scheduler, so schedulers and workers see concrete values.
    """

    max_tokens: int | None = None  # new tokens at most; None: up to the context length
    temperature: float | None = None  # 0 means greedy
    top_p: float | None = None  # nucleus mass kept, in (0, 1]
    top_k: int | None = None  # keep the k most likely tokens; 0 means all
    min_p: float | None = None  # drop tokens below min_p * p(top token)
    seed: int | None = None  # per-request generator: same seed, same output
    stop: list[str] = []  # stop strings, matched on the detokenized text by the frontend
    stop_token_ids: list[int] = []  # extra token ids that end the request
    ignore_eos: bool = False  # keep generating past the model's end-of-sequence ids
    min_tokens: int = 0  # EOS and stop ids are not honoured before this many tokens
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0  # subtracted from logits of tokens already in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    logprobs: int | None = None  # None: none; k: the sampled token's and the top-k logprobs
    structured: StructuredOutput | None = None  # constrained decoding (JSON schema, regex, grammar)

    def validate(self) -> None:
        """Raise ``InvalidParam`` naming the first field that is out of range."""
        for name, bad, message in self._checks():
            if bad:
                raise InvalidParam(name, message)

    def _checks(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        yield ("max_tokens", self.max_tokens is not None and self.max_tokens < 1,
               f"max_tokens must be at least 1, got {self.max_tokens}")
        yield ("temperature", t is not None and not (0.0 <= t <= 100.0),
               f"temperature must be in [0, 100], got {t}")
        yield "top_p", p is not None and not (0.0 < p <= 1.0), f"top_p must be in (0, 1], got {p}"
        yield "top_k", k is not None and k < 0, f"top_k must be >= 0, got {k}"
        yield ("min_p", self.min_p is not None and not (0.0 <= self.min_p <= 1.0),
               f"min_p must be in [0, 1], got {self.min_p}")
        yield ("min_tokens", self.min_tokens < 0
               or (self.max_tokens is not None and self.min_tokens > self.max_tokens),
               "min_tokens must be between 0 and max_tokens")
        yield "seed", self.seed is not None and not (0 <= self.seed < 2**63), "seed must be in [0, 2**63)"
        yield "stop", any(not s for s in self.stop), "stop strings must not be empty"
        yield ("stop_token_ids", any(t < 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative")
        yield ("presence_penalty", not (-2.0 <= self.presence_penalty <= 2.0),
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        yield ("frequency_penalty", not (-2.0 <= self.frequency_penalty <= 2.0),
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        yield ("repetition_penalty", not (0.0 < self.repetition_penalty <= 10.0),
               f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        yield ("logit_bias", any(not (-100.0 <= b <= 100.0) for b in self.logit_bias.values()),
               "logit_bias values must be in [-100, 100]")
        yield ("logprobs", self.logprobs is not None and not (0 <= self.logprobs <= 20),
               f"logprobs must be in [0, 20], got {self.logprobs}")
        so = self.structured
        yield ("structured", so is not None and so.kind not in STRUCTURED_KINDS,
               f"unknown structured output kind {so and so.kind!r}; use one of {list(STRUCTURED_KINDS)}")
        yield ("structured", so is not None and so.kind != "json" and not so.spec.strip(),
               f"structured output of kind {so and so.kind!r} needs a spec (the schema, regex or grammar)")
        # NOTE: a complete grammar lets only the end-of-sequence ids follow
        yield ("ignore_eos", so is not None and self.ignore_eos,
               "ignore_eos cannot be combined with structured output (it ends with EOS)")

    def finish_reason(self, token: int, num_output_tokens: int, eos_token_ids) -> str | None:
        """Why a request ends once ``token`` is its ``num_output_tokens``-th output token:
        "stop" (an EOS or stop id, after ``min_tokens``), "length" (``max_tokens``), or None.

        NOTE: the scheduler and the workers decide with this one rule (a worker that runs
        several decode steps from one plan stops a request where the scheduler will).
        """
        if num_output_tokens >= self.min_tokens and (token in eos_token_ids or token in self.stop_token_ids):
            return "stop"
        if self.max_tokens is not None and num_output_tokens >= self.max_tokens:
            return "length"
        return None

    def resolve(self, defaults: dict[str, Any], max_tokens: int) -> "SamplingParams":
        """A copy with every ``None`` replaced: ``defaults`` first, then neutral values.
        ``max_tokens`` caps the output at what the context leaves."""

        def pick(name: str, neutral: Any) -> Any:
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name)
            return neutral if value is None else value

        return msgspec.structs.replace(
            self,
            max_tokens=min(self.max_tokens or max_tokens, max_tokens),
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            min_p=float(pick("min_p", 0.0)),
        )


class ToolCallFunction(msgspec.Struct, forbid_unknown_fields=True):
    """The function a tool call names, with its arguments as JSON text (as OpenAI sends them)."""

    name: str
    arguments: str = "{}"


class ToolCall(msgspec.Struct, forbid_unknown_fields=True):
    """A tool call an assistant turn made, fed back through the chat template."""

    id: str
    function: ToolCallFunction
    type: str = "function"


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    """One turn of a chat conversation, rendered by the model's chat template."""

    role: str
    content: str = ""
    tool_calls: list[ToolCall] = []  # an assistant turn's calls
    tool_call_id: str | None = None  # a "tool" turn: the call it answers
    name: str | None = None  # a "tool" turn: the function's name (some templates show it)


# --------------------------------------------------------------------------------------
# Control calls: one generic request/reply for health, stats, shutdown and the like
# --------------------------------------------------------------------------------------


class ControlCall(msgspec.Struct, tag="control_call"):
    """Ask an actor to run ``method`` with ``args``; answered by a ``ControlReply``."""

    call_id: int  # chosen by the caller, echoed in the reply
    method: str  # e.g. "health", "stats", "shutdown"
    args: dict[str, Any] = {}
    reply_to: str = ""  # where the answer goes, on one-way sockets (a router's reports)


class ControlReply(msgspec.Struct, tag="control_reply"):
    """The answer to a ``ControlCall``: ``result`` when ``ok``, else ``error``."""

    call_id: int
    ok: bool
    result: Any = None
    error: str | None = None


# --------------------------------------------------------------------------------------
# Client (SDK) <-> frontend: DEALER -> ROUTER
# --------------------------------------------------------------------------------------


class GenerateRequest(msgspec.Struct, tag="generate", forbid_unknown_fields=True):
    """A client's request. Exactly one of ``prompt``, ``prompt_token_ids``, ``messages``."""

    req_id: str  # chosen by the client, unique per client connection
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = True  # False: one reply when the request finishes
    priority: int = 0  # lower runs first under the `priority` policy
    offline: bool = False  # offline requests only use spare capacity
    add_special_tokens: bool = True  # BOS etc. for raw text prompts
    tools: list[dict[str, Any]] = []  # OpenAI function definitions, given to the chat template


class AbortRequest(msgspec.Struct, tag="abort"):
    """Stop a request now and free its KV memory. Unknown ids are ignored."""

    req_id: str


ClientMessage = Union[GenerateRequest, AbortRequest, ControlCall]


class TokenLogprob(msgspec.Struct, array_like=True):
    """One output token's log-probability and the most likely alternatives at its place."""

    token_id: int
    token: str  # the token's text on its own
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, logprob), most likely first


class RequestDelta(msgspec.Struct, omit_defaults=True):
    """What one request gained in one engine step (or all of it, when not streaming)."""

    req_id: str
    text: str = ""  # new detokenized text (stop strings held back until resolved)
    token_ids: list[int] = []  # new token ids
    finish_reason: str | None = None  # "stop", "length", "abort"; "error" with ``error``
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # output tokens so far, this delta included
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for
    queue_time: float = 0.0  # seconds from arrival to the first step that ran it
    error: str | None = None  # why it ended, when finish_reason is "error"


class RequestOutputs(msgspec.Struct, tag="outputs"):
    """Everything one client's requests gained in one engine step: one message, many deltas."""

    deltas: list[RequestDelta]


class ErrorReply(msgspec.Struct, tag="error"):
    """A request or message that was refused. The connection and the engine keep going."""

    code: str  # "bad_request", "not_found", "overloaded", "unavailable", "internal"
    message: str
    req_id: str | None = None
    param: str | None = None  # the request field at fault, when one is


ClientReply = Union[RequestOutputs, ErrorReply, ControlReply]


# --------------------------------------------------------------------------------------
# Frontend -> router -> scheduler; scheduler -> frontend (the request's route)
#
# A frontend sends requests, aborts and control calls to the router (DEALER -> ROUTER);
# the router forwards each request to one instance's scheduler (PUSH -> PULL). Outputs
# skip the router: a scheduler sends them straight to the route the request carries.
# --------------------------------------------------------------------------------------


class TokenizedRequest(msgspec.Struct, tag="tokenized"):
    """A request ready to schedule: token ids and the resolved end conditions."""

    req_id: str  # unique in the deployment: the frontend's id, a dash, its counter
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: list[int]  # the model's EOS ids (empty when ignore_eos)
    arrival_time: float  # time.time() at the frontend
    priority: int = 0
    offline: bool = False
    reply_to: str = ""  # where the scheduler sends this request's outputs (a frontend)
    block_hashes: list[int] = []  # chained hashes of the prompt's full blocks (block_hash.py)
    block_size: int = 0  # the block size block_hashes were computed for


class InstanceLost(msgspec.Struct, tag="instance_lost"):
    """Router -> frontend: an instance is gone; these of your requests were on it."""

    instance_id: str
    req_ids: list[str]


RouterInput = Union[TokenizedRequest, AbortRequest, ControlCall]


# --------------------------------------------------------------------------------------
# Adaptive PD (README "Adaptive PD"): what an instance measured of itself, and the router
# turning a prefill instance into a decode instance or back while it runs.
#
# The router stops sending the instance work of its old role and sends ``RoleChange``;
# the scheduler announces the change in the store (``InstanceRecord.next_role``), lets
# the old role's requests finish (it still serves whatever reaches it), switches, puts
# its new role in the store and tells every router (``RoleChanged``).
# --------------------------------------------------------------------------------------


class InstanceProfile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An instance's service times, measured by its workers at start and fitted by least
    squares (``xllm.perf_model``); published with its registration."""

    prefill: tuple[float, float, float]  # (p0, p1, p2): seconds to prefill L tokens alone = p0 + p1·L + p2·L²
    decode: tuple[float, float, float]  # (d0, d1, d2): one decode step of B requests holding C context
    # tokens in all (B × their mean context) = d0 + d1·B + d2·C
    prefill_error: float = 0.0  # relative RMS error of the prefill fit over its samples
    decode_error: float = 0.0  # relative RMS error of the decode fit over its samples
    max_prompt: int = 0  # the longest prompt measured (beyond it the fit extrapolates)
    max_batch: int = 0  # the largest decode batch measured
    max_context: int = 0  # the most context tokens of a measured decode step
    threads: int = 1  # torch threads of the worker that measured it
    seconds: float = 0.0  # how long measuring took (0: read from the cache)


class RoleChange(msgspec.Struct, tag="role_change"):
    """Router -> scheduler: become ``role`` ("prefill" or "decode") once the requests of the
    old role have finished, or after ``drain_timeout_s`` whatever is left (it finishes
    beside the new work); answered by ``RoleChanged`` to every router."""

    change_id: int  # chosen by the router, echoed in the answer
    role: str
    drain_timeout_s: float = 30.0
    migrate_to: list["MigrationTarget"] = []  # leaving decode: move decoding requests there (none: wait)


class RoleChanged(msgspec.Struct, tag="role_changed"):
    """Scheduler -> every router: the instance's role is now ``role`` (``ok``), or the
    change was refused (``error``)."""

    instance_id: str
    incarnation: str
    change_id: int
    role: str  # the role it has now
    ok: bool = True
    error: str = ""
    drain_s: float = 0.0  # seconds from the order to the switch
    left_over: int = 0  # requests of the old role still running when it switched (drain timed out)


# --------------------------------------------------------------------------------------
# Prefill/decode disaggregation (xllm.kv_transfer, README "Prefill/decode disaggregation")
#
# The router sends a request to a decode instance, naming a prefill instance. The decode
# scheduler allocates the prompt's blocks, tells its KV agent to expect them, and asks
# the prefill scheduler to prefill into them. The prefill agent pushes each step's
# blocks layer by layer as the worker stores them, then the first token; the decode
# agent writes them into its pool and acknowledges. Each scheduler gets its blocks back
# only from its own agent's word (``KVReleased`` / ``KVReceived``), so no block is
# reused while an agent may still read or write it.
# --------------------------------------------------------------------------------------


class DisaggregatedRequest(msgspec.Struct, tag="pd_request"):
    """Router -> decode scheduler: serve ``request``; ``prefill_instance`` prefills it."""

    request: TokenizedRequest
    prefill_instance: str
    prefill_address: str  # that instance's scheduler input


class PrefillRequest(msgspec.Struct, tag="prefill"):
    """Decode scheduler -> prefill scheduler: compute the prompt's KV and first token and
    push them into ``block_ids`` of the decode instance."""

    request: TokenizedRequest
    decode_instance: str
    decode_address: str  # the decode scheduler's input
    decode_agent: str  # the decode KV agent's input: where the KV goes
    block_ids: list[int]  # the decode side's blocks for the prompt, in order
    migration: bool = False  # not a prompt to compute: the KV of a request this instance is moving there


class PrefillLost(msgspec.Struct, tag="prefill_lost"):
    """Router or prefill scheduler -> decode scheduler: these requests will get no KV from
    that prefill instance (it is gone, or refused them)."""

    instance_id: str
    req_ids: list[str]
    reason: str = ""


class KVReleased(msgspec.Struct, tag="kv_released"):
    """Prefill agent -> its scheduler: it is done with the request's blocks (the decode
    side has the KV, or the transfer was cancelled or failed)."""

    req_id: str
    ok: bool
    error: str = ""
    num_bytes: int = 0  # KV sent for it
    seconds: float = 0.0  # from its first send to the decode side's acknowledgement


class KVReceived(msgspec.Struct, tag="kv_received"):
    """Decode agent -> its scheduler: the request's KV is in its blocks (``ok``), or the
    transfer was cancelled or failed; either way the agent no longer writes them."""

    req_id: str
    ok: bool
    first_token: int = -1
    first_logprobs: Any = None  # as ``TokenBatch.logprobs`` holds one token's
    num_cached_tokens: int = 0  # prompt tokens the prefill side found in its cache
    error: str = ""
    num_bytes: int = 0  # KV received for it
    seconds: float = 0.0  # from its expectation to its completion
    exposed_seconds: float = 0.0  # from the prefill's last layer stored to its last KV written here


# --------------------------------------------------------------------------------------
# Migration (README "Migration"): a running request moves, KV and all, to another
# instance and continues there. The router orders an instance to move its decoding
# requests (``ControlCall`` "migrate", for a drain; ``RoleChange.migrate_to``, for a role
# change). The source stops scheduling each one, lets its steps in flight land, and hands
# it over (``MigratedRequest``); the target then pulls its KV exactly as a decode instance
# pulls a prefill's (``KVExpect`` -> ``PrefillRequest(migration=True)`` -> the source's
# agent pushes the blocks), and decodes on from the same tokens.
# --------------------------------------------------------------------------------------


class MigrationTarget(msgspec.Struct, array_like=True):
    """An instance a request may move to."""

    instance_id: str
    address: str  # its scheduler's input


class MigratedRequest(msgspec.Struct, tag="migrated"):
    """Source scheduler -> target scheduler: this running request is yours now. Its KV for
    ``num_computed_tokens`` tokens (prompt, then outputs) is at the source; pull it, then
    decode on. Refused with ``PrefillLost`` to ``source_address`` (it stays at the source)."""

    request: TokenizedRequest  # as it came (its route, sampling, end conditions)
    output_token_ids: list[int]  # sampled so far (already streamed by the source)
    num_computed_tokens: int  # tokens whose KV the source holds: prompt + outputs - 1
    source_instance: str
    source_address: str  # its scheduler's input
    num_cached_tokens: int = 0  # prompt tokens its first instance found cached
    queue_time: float = 0.0  # seconds it waited before its first step


# --------------------------------------------------------------------------------------
# KV tiers (README "KV cache tiers"): an instance's scheduler decides which blocks go
# down from its device pool to host memory and disk and which come back up; its KV agent
# copies them, strictly in the order it is told, and says when it is done. The scheduler
# holds every device block an order names until the agent's ``KVTierDone``.
# --------------------------------------------------------------------------------------

KV_TIERS = ("device", "host", "disk")  # a block's tier, fastest first; on the wire, its index here
TIER_OPS = ("load", "store", "spill", "fetch", "drop")


class BlockStored(msgspec.Struct, array_like=True):
    """A full block entered one tier of an instance's prefix cache (after vLLM's KV event)."""

    block_hash: int
    parent_hash: int  # 0 for the first block of a sequence
    token_ids: list[int]
    tier: int = 0  # index into KV_TIERS: device, host or disk


class BlockRemoved(msgspec.Struct, array_like=True):
    """A block left one tier of an instance's prefix cache."""

    block_hash: int
    tier: int = 0  # index into KV_TIERS


class KVTierOp(msgspec.Struct, array_like=True):
    """One move between an instance's tiers (``kind`` one of ``TIER_OPS``):

    - ``load``: host ``host_slot`` -> device ``device_block``, layer by layer while the
      order's step runs (the workers wait for each layer before its attention);
    - ``store``: device ``device_block`` -> host ``host_slot``, once the order's step has
      stored its KV (``parent_hash`` and ``token_ids`` name the block's contents);
    - ``spill``: host ``host_slot`` -> the block's disk file (before the slot is reused);
    - ``fetch``: the block's disk file -> host ``host_slot``, verified (checksum, hash and
      token ids) before anything may load it;
    - ``drop``: delete the block's disk file.
    """

    kind: str
    block_hash: int  # the block's chained hash (``xllm.block_hash``); names its disk file
    host_slot: int = -1
    device_block: int = -1
    parent_hash: int = 0  # store: its parent block's hash
    token_ids: list[int] = []  # store: its token ids


class KVTierOrder(msgspec.Struct, tag="kv_tier_order"):
    """Scheduler -> its agent: ``ops`` in order, after every earlier order. Loads come
    first and run while step ``step_id`` runs; stores wait until that step's KV is stored;
    the rest run at once (in order)."""

    job_id: int  # echoed by ``KVTierDone``
    step_id: int  # the step that reads the loads and computed the stored blocks
    ops: list[KVTierOp]


class KVTierDone(msgspec.Struct, tag="kv_tier_done"):
    """Agent -> its scheduler: every op of ``job_id`` is done (or refused); the device
    blocks it named are the scheduler's again."""

    job_id: int
    failed: list[int] = []  # hashes whose fetch failed its checks (or found no file): the file is gone
    load_seconds: float = 0.0  # from the step's start to its loads written in full
    fetch_seconds: float = 0.0  # spent reading (and checking) its blocks from disk


class KVTierInventory(msgspec.Struct, tag="kv_tier_inventory"):
    """Agent -> its scheduler, once at start: the blocks its disk tier holds from an earlier
    run, least recently used first (their bytes are verified when fetched)."""

    blocks: list[BlockStored]


SchedulerInput = Union[TokenizedRequest, AbortRequest, ControlCall, DisaggregatedRequest, PrefillRequest,
                       PrefillLost, KVReleased, KVReceived, RoleChange, KVTierDone, KVTierInventory, MigratedRequest]


class KVSend(msgspec.Struct, array_like=True):
    """Blocks of one request a step writes, and where they go."""

    req_id: str
    src_blocks: list[int]  # the prefill side's
    dst_blocks: list[int]  # the decode side's, one for one
    dst_agent: str


class KVSendPlan(msgspec.Struct, tag="kv_send_plan"):
    """Prefill scheduler -> its agent: push these blocks of step ``step_id``, each layer as
    soon as the worker has stored it."""

    step_id: int
    sends: list[KVSend]


class KVSendDone(msgspec.Struct, tag="kv_send_done"):
    """Prefill scheduler -> its agent: the request's prefill is complete; once its blocks
    are sent, hand the decode side its first token."""

    req_id: str
    first_token: int
    first_logprobs: Any = None
    num_cached_tokens: int = 0


class KVExpect(msgspec.Struct, tag="kv_expect"):
    """Decode scheduler -> its agent: KV for ``req_id`` may be written into these blocks;
    then the agent forwards ``prefill`` to the prefill scheduler at ``prefill_address``
    (through the agent, so the expectation is in place before any KV can arrive)."""

    req_id: str
    block_ids: list[int]
    prefill: PrefillRequest
    prefill_address: str


class KVCancel(msgspec.Struct, tag="kv_cancel"):
    """A scheduler -> its agent: stop moving this request's KV; answer with its release."""

    req_id: str


class KVLayer(msgspec.Struct, tag="kv_layer"):
    """Prefill agent -> decode agent: one layer of some blocks of a request, one rank's
    share; ``k`` and ``v`` are ``(len(dst_blocks), block_bytes)`` uint8, as frames."""

    req_id: str
    rank: int
    layer: int
    dst_blocks: list[int]
    k: np.ndarray
    v: np.ndarray


class KVComplete(msgspec.Struct, tag="kv_complete"):
    """Prefill agent -> decode agent: every block is sent (``num_messages`` ``KVLayer``
    messages in all); here is the first token. Answered by ``KVAck``."""

    req_id: str
    num_messages: int  # KVLayer messages sent for the request, all ranks
    first_token: int
    reply_to: str  # the prefill agent's input
    first_logprobs: Any = None
    num_cached_tokens: int = 0
    stored_at: float = 0.0  # time.time() when the prefill's last layer was seen stored


class KVAck(msgspec.Struct, tag="kv_ack"):
    """Decode agent -> prefill agent: the request's KV is stored (or refused, why)."""

    req_id: str
    ok: bool
    error: str = ""


KVAgentInput = Union[KVSendPlan, KVSendDone, KVExpect, KVCancel, KVLayer, KVComplete, KVAck, KVTierOrder]


class TokenBatch(msgspec.Struct, tag="tokens"):
    """What one engine step produced for one frontend, columnar: one message per step and
    route, never per token.

    ``req_ids[i]`` gained ``new_token_ids[i]``; ``finish_reasons[i]`` is set when that
    request ended in this step ("stop", "length", "abort") and None otherwise.
    """

    step_id: int
    req_ids: list[str]
    new_token_ids: list[list[int]]
    finish_reasons: list[str | None]
    num_cached_tokens: list[int]  # prompt tokens that came from the prefix cache
    queue_times: list[float]  # seconds from arrival to first scheduled
    logprobs: list[list[tuple[int, float, list[int], list[float]]] | None] = []
    # per request, when asked for: per new token (id, logprob, top ids, top logprobs)
    instance_id: str = ""  # the instance that produced it


class RequestRejected(msgspec.Struct, tag="rejected"):
    """The scheduler (or the router) refused a request (e.g. longer than the context)."""

    req_id: str
    message: str
    code: str = "bad_request"  # "overloaded" when the queue is full, "unavailable": no instance


FrontendInput = Union[TokenBatch, RequestRejected, ControlReply, InstanceLost]


# --------------------------------------------------------------------------------------
# Scheduler -> router: what the global scheduler knows of each instance, pushed
# --------------------------------------------------------------------------------------


class InstanceLoad(msgspec.Struct, tag="load"):
    """An instance's load, about twice a second (over the bus, never through the store)."""

    instance_id: str
    incarnation: str  # changes when the instance restarts
    num_waiting: int
    num_running: int
    num_free_blocks: int  # free now (cached blocks included: they can be evicted)
    num_blocks: int
    ttft_s: float  # recent mean seconds from arrival to the first token (0: none yet)
    tpot_s: float  # recent mean seconds per output token after the first
    finished_req_ids: list[str] = []  # requests that ended since the last report
    num_waiting_blocks: int = 0  # KV blocks the waiting requests' tokens will take
    mean_output_tokens: float = 0.0  # recent mean output tokens of the requests it finished (0: none yet)
    moved: dict[str, str] = {}  # requests it handed to another instance since the last report -> that instance
    num_prefill_tokens: int = 0  # prompt tokens its running requests have yet to compute (a prefill in progress)


class KVEventBatch(msgspec.Struct, tag="kv_events"):
    """Changes to one instance's prefix cache (every tier) since its last batch, in order."""

    instance_id: str
    incarnation: str
    stored: list[BlockStored] = []
    removed: list[BlockRemoved] = []  # blocks a tier evicted
    cleared: bool = False  # the whole cache, every tier, was reset (before ``stored``)


class InstanceLeaving(msgspec.Struct, tag="leaving"):
    """Scheduler -> every router: this instance is about to stop cleanly; send it no new
    work and move its decoding requests to the other instances of its role (as ``drain``)."""

    instance_id: str
    incarnation: str


InstanceReport = Union[InstanceLoad, KVEventBatch, ControlReply, RoleChanged, InstanceLeaving]


# --------------------------------------------------------------------------------------
# The metadata store: records under the keys of ``xllm.metastore.keys`` (JSON), and the
# embedded store's socket (control calls ``store.<verb>``)
# --------------------------------------------------------------------------------------


class InstanceRecord(msgspec.Struct):
    """An instance's registration: how to reach it and what it can hold."""

    instance_id: str
    incarnation: str  # new on every start: a restarted instance is told apart
    address: str  # its scheduler's input (where the router sends requests)
    role: str = "mixed"
    model: str = ""  # the served model's name
    num_blocks: int = 0  # KV blocks in its pool
    block_size: int = 16
    max_num_seqs: int = 64
    next_role: str = ""  # the role it is draining towards ("": no change under way); routers send it no new work
    profile: InstanceProfile | None = None  # its measured service times (None until its workers measured them)


class RouterRecord(msgspec.Struct):
    """A router's registration: where instances send it their reports."""

    name: str
    reports: str  # its InstanceReport socket


StoreInput = ControlCall
StoreOutput = Union[ControlReply, ErrorReply]


# --------------------------------------------------------------------------------------
# Scheduler <-> workers: the step contract
# --------------------------------------------------------------------------------------


class NewRequestData(msgspec.Struct, array_like=True):
    """Everything a worker needs about a request it has not seen (or lost to preemption)."""

    req_id: str
    token_ids: list[int]  # prompt plus every output token the scheduler already knows
    block_ids: list[int]  # the request's KV blocks, in order
    sampling: SamplingParams
    num_prompt_tokens: int = 0  # the first tokens of token_ids that are the prompt
    eos_token_ids: list[int] = []  # masked out until sampling.min_tokens are out


class StepPlan(msgspec.Struct, tag="plan"):
    """One engine step, sent to every worker rank. The worker never changes it.

    The batch is ``scheduled_req_ids`` in order; request i computes the tokens at
    positions ``num_computed[i] .. num_computed[i] + num_scheduled[i] - 1``. A request
    samples a token at every position of that range from the last token it knows on. For a
    running request the token at the last known position may be a placeholder for the
    token the previous step samples: the worker fills it from its own output (async
    scheduling). A range that goes past the known tokens is a multi-step decode: each
    sampled token is the input of the next position, and the request stops early where
    ``SamplingParams.finish_reason`` ends it (the scheduler has allocated KV for the
    whole range).
    """

    step_id: int
    new_requests: list[NewRequestData]  # requests this worker has no state for
    new_block_ids: dict[str, list[int]]  # blocks appended to running requests
    scheduled_req_ids: list[str]
    num_scheduled: list[int]  # tokens to compute per scheduled request
    num_computed: list[int]  # tokens already in the KV cache per scheduled request
    finished_req_ids: list[str]  # drop the worker's state for these (done/aborted/preempted)
    # KV tiers: the KV agent writes blocks of this step's requests (loaded back from host
    # memory) while it runs; attention waits for each layer's (``xllm.kv_transfer.pool``)
    loads_kv: bool = False


class StepResult(msgspec.Struct, tag="result"):
    """What rank 0 sampled in one step: ``req_ids[i]`` gained ``token_ids[i]``. A request
    that sampled several tokens (multi-step decode) appears once per token, in order."""

    step_id: int
    req_ids: list[str]
    token_ids: list[int]
    forward_s: float  # time spent in the model forward and sampling
    # Only when some request asked for logprobs: one row per such token, in the order of
    # ``req_ids`` (``logprob_req_ids`` names each row's request).
    logprob_req_ids: list[str] = []
    logprobs: np.ndarray | None = None  # (R,) float32, the sampled tokens' logprobs
    top_ids: np.ndarray | None = None  # (R, K) int32, K = the largest k asked for
    top_logprobs: np.ndarray | None = None  # (R, K) float32
    # Speculative decoding: req id -> (draft tokens proposed, of them accepted) this step
    spec_counts: dict[str, tuple[int, int]] = {}
    kv_load_wait_s: float = 0.0  # KV tiers: time attention waited for blocks the agent was loading


class WorkerError(msgspec.Struct, tag="worker_error"):
    """A step failed on a worker. The scheduler reports it; the launcher stops everyone."""

    step_id: int
    message: str


WorkerInput = Union[StepPlan, ControlCall]
WorkerOutput = Union[StepResult, WorkerError, ControlReply]


# --------------------------------------------------------------------------------------
# Actors -> launcher
# --------------------------------------------------------------------------------------


class ActorReady(msgspec.Struct, tag="ready"):
    """An actor finished starting and serves its sockets."""

    name: str
    pid: int
    info: dict[str, Any] = {}  # e.g. the worker's KV block count


class ActorFailed(msgspec.Struct, tag="failed"):
    """An actor hit an error it cannot recover from; the launcher stops the deployment."""

    name: str
    message: str
    pid: int = 0  # the failed process (the supervisor ignores one it already replaced)


class ActorDrained(msgspec.Struct, tag="drained"):
    """A scheduler asked to drain before a clean stop (SIGUSR1 from its launcher) holds no
    request any more: each moved to another instance or finished."""

    name: str
    pid: int


LauncherInput = Union[ActorReady, ActorFailed, ActorDrained]

ALL_UNIONS = {
    "client": ClientMessage,
    "client_reply": ClientReply,
    "router": RouterInput,
    "instance_report": InstanceReport,
    "store_reply": StoreOutput,
    "scheduler": SchedulerInput,
    "frontend": FrontendInput,
    "worker": WorkerInput,
    "worker_output": WorkerOutput,
    "launcher": LauncherInput,
    "kv_agent": KVAgentInput,
}
