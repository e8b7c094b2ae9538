"""The scheduler's view of one request."""

from __future__ import annotations

import enum
from typing import Sequence

from ..protocol import SamplingParams, TokenizedRequest


class Status(enum.Enum):
    WAITING = "waiting"  # new, or preempted and waiting to be recomputed
    RUNNING = "running"
    MOVING = "moving"  # leaving for another instance (migration): no new step; its blocks held
    FINISHED = "finished"


class Request:
    """Token bookkeeping for one request.

    NOTE: the one rule of the scheduler — ``num_computed_tokens`` catches up to
    ``num_tokens``. ``num_tokens`` counts the prompt, the output tokens already known and
    ``num_placeholders`` tokens that steps in flight will sample (async scheduling).
    """

    __slots__ = (
        "req_id", "prompt_token_ids", "output_token_ids", "sampling", "eos_token_ids", "arrival_time", "priority", "offline", "num_computed_tokens",
        "num_placeholders", "block_ids", "block_hashes", "status", "on_worker",
        "num_blocks_sent", "num_cached_blocks", "num_cached_tokens", "finish_reason", "num_preemptions",
        "queue_time", "reply_to", "last_token_time", "remote_prefill", "remote_decode", "tier_job", "tier_fetched",
        "tier_pins",
    )

    def __init__(self, msg: TokenizedRequest) -> None:
        self.req_id = msg.req_id
        self.prompt_token_ids: list[int] = list(msg.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling: SamplingParams = msg.sampling
        self.eos_token_ids = frozenset(msg.eos_token_ids)
        self.arrival_time = msg.arrival_time
        self.priority = msg.priority
        self.offline = msg.offline
        self.num_computed_tokens = 0
        self.num_placeholders = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.status = Status.WAITING
        self.on_worker = False  # the workers hold this request's state
        self.num_blocks_sent = 0  # block ids the workers know
        self.num_cached_blocks = 0  # leading blocks already offered to the prefix cache
        self.num_cached_tokens = -1  # prompt tokens found in the prefix cache (-1: not looked up)
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.queue_time: float | None = None  # seconds from arrival to the first step that ran it
        self.reply_to = msg.reply_to  # the route of its outputs
        self.last_token_time: float | None = None  # when its last output token came back
        self.remote_prefill = None  # disagg.RemotePrefill: its prompt's KV comes from another instance
        self.remote_decode = None  # disagg.RemoteDecode: its KV goes to another instance
        self.tier_job = 0  # KV tiers: the order fetching its prefix from disk (0: none); it waits for it
        self.tier_fetched = False  # its prefix was fetched from disk once (a failed block is recomputed)
        self.tier_pins: list[int] = []  # host blocks of its prefix kept from eviction while it waits to load them

    # -- token counts ---------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_placeholders

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Outputs sampled so far, the ones still in flight included."""
        return len(self.output_token_ids) + self.num_placeholders

    def known_token_ids(self) -> Sequence[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def wants_more(self) -> bool:
        """False once the in-flight samples already reach max_tokens."""
        return self.num_output_tokens < self.sampling.max_tokens

    # -- ending ---------------------------------------------------------------------------
    def append_token(self, token: int, max_model_len: int) -> str | None:
        """Record a sampled token; returns the finish reason if the request ends now."""
        self.output_token_ids.append(token)
        reason = self.sampling.finish_reason(token, len(self.output_token_ids), self.eos_token_ids)
        if reason is None and self.num_known_tokens >= max_model_len:
            return "length"
        return reason

    def decode_steps(self, limit: int, max_model_len: int) -> int:
        """Tokens this decoding request may sample in one multi-step plan: at most
        ``limit``, and never past ``max_tokens`` or the context (counting in-flight ones)."""
        return max(1, min(limit, self.sampling.max_tokens - self.num_output_tokens,
                          max_model_len - self.num_tokens))
