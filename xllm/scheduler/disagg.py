"""The scheduler's side of prefill/decode disaggregation: the connector hooks.

A disaggregated request lives on two instances. Its **decode** instance (the one the
router chose, which streams its outputs) admits it like any request, but allocates
blocks for its whole prompt and computes none of it: the tokens come from elsewhere
(``external_tokens``). Once allocated (``after_allocate``) the blocks are announced to
its KV agent, which forwards the ``PrefillRequest`` to the **prefill** instance. There
the request runs as a one-token request; each step that computes some of its KV also
says which blocks its agent must push (``on_step``), and when it samples its token the
request does not end: its blocks stay held (``on_finish`` says "later") until the agent
reports the decode side has the KV (``KVReleased``). The decode side then folds the
first token in (``KVReceived``) and decodes as usual.

A scheduler gets a transfer's blocks back only from its own agent's word, never from
its clock: a timeout, an abort or a lost peer sends the agent ``KVCancel`` and the blocks
stay held until the agent answers. So no block is reused while the agent may still read
or write it. A decode request whose transfer fails falls back to computing its prompt
itself (counted in ``kv_recomputed``).

These hooks are kept apart from the core rule so the host/disk KV tiers can use the
same ones (tokens that come from elsewhere; free now or later).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from ..protocol import (
    DisaggregatedRequest, KVCancel, KVExpect, KVReceived, KVReleased, KVSend, KVSendDone, PrefillRequest,
    TokenizedRequest,
)
from .request import Request, Status


@dataclass
class RemotePrefill:
    """Decode side: where the request's prompt KV comes from."""

    instance: str
    address: str  # its scheduler's input
    deadline: float = 0.0  # monotonic; set when the blocks are announced
    cancelling: bool = False  # KVCancel sent; waiting for the agent's word
    aborted: bool = False  # the client is gone: end it once the agent lets go
    migrated_tokens: int = 0  # a request moving here (migration): tokens whose KV comes (0: a prompt's)


@dataclass
class RemoteDecode:
    """Prefill side: where the request's KV goes."""

    instance: str
    address: str  # the decode scheduler's input
    agent: str  # the decode KV agent's input
    block_ids: list[int]  # the decode side's blocks, in order
    num_blocks_sent: int = 0  # leading blocks whose every token was sent
    deadline: float = 0.0  # set once the prefill is complete
    cancelling: bool = False  # KVCancel sent; waiting for the agent's word
    notify: bool = False  # tell the decode side when the agent lets go (it did not ask)
    planned: bool = False  # the agent has heard of it (it may read its blocks)
    migration: bool = False  # a running request moving there, not a prefill


@dataclass
class KVOutbox:
    """What the scheduler's actor must tell the KV agent (and peers) after a verb."""

    sends: list[KVSend] = field(default_factory=list)  # of the step just planned
    moves: list[KVSend] = field(default_factory=list)  # of migrations: KV already stored, sent at once
    to_agent: list = field(default_factory=list)  # KVExpect, KVSendDone, KVCancel, in order
    aborts: list[tuple[str, str]] = field(default_factory=list)  # (prefill address, req id)
    lost: list[tuple[str, str, str]] = field(default_factory=list)  # (decode address, req id, why)


@dataclass
class TransferStats:
    kv_transfers: int = 0  # completed, this side
    kv_transfer_failures: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0  # summed over completed transfers
    kv_exposed_seconds: float = 0.0  # decode side: KV still moving after the prefill ended, summed
    kv_recomputed: int = 0  # decode requests that computed their prompt after a failed transfer


class Disaggregation:
    """Mixed into ``Scheduler``: PD bookkeeping on both sides (see the module docstring).

    Expects of the scheduler: ``requests``, ``running``, ``blocks``, ``stats``,
    ``max_model_len``, ``_enqueue``, ``_finish``, ``_forget_on_worker``, ``add_request``.
    """

    def _init_disaggregation(self, timeout_s: float, agent_address: str = "", instance_id: str = "",
                             address: str = "") -> None:
        self.kv_timeout_s = timeout_s
        self.agent_address = agent_address  # this instance's agent (the decode side's KV goes there)
        self.instance_id = instance_id
        self.address = address
        self.receiving: dict[str, Request] = {}  # decode side: blocks held, KV on its way
        self.sending: dict[str, Request] = {}  # prefill side: prefill done, blocks held until released
        self.kv = KVOutbox()
        self.transfer_stats = TransferStats()

    def take_outbox(self) -> KVOutbox:
        out, self.kv = self.kv, KVOutbox()
        return out

    # -- decode side --------------------------------------------------------------------------
    def add_disaggregated(self, msg: DisaggregatedRequest) -> None:
        """Queue a request whose prompt another instance prefills (raises like ``add_request``)."""
        self.add_request(msg.request)
        self.requests[msg.request.req_id].remote_prefill = RemotePrefill(msg.prefill_instance,
                                                                         msg.prefill_address)

    def external_tokens(self, req: Request) -> int:
        """Tokens whose KV will come from elsewhere (0: compute them here): a prompt, or a
        moving request's all but last."""
        rp = req.remote_prefill
        if rp is None:
            return 0
        if rp.migrated_tokens:
            return rp.migrated_tokens
        return 0 if req.output_token_ids else len(req.prompt_token_ids)

    def after_allocate(self, req: Request) -> None:
        """The request's blocks for its external tokens are allocated: announce them."""
        rp = req.remote_prefill
        rp.deadline = time.monotonic() + self.kv_timeout_s
        req.status = Status.RUNNING
        self.receiving[req.req_id] = req
        prefill = PrefillRequest(self._as_tokenized(req), self.instance_id, self.address, self.agent_address,
                                 list(req.block_ids), migration=rp.migrated_tokens > 0)
        self.kv.to_agent.append(KVExpect(req.req_id, list(req.block_ids), prefill, rp.address))

    def kv_received(self, msg: KVReceived):
        """The agent's word on a transfer to this side; returns the request if its first
        token is now known (the actor emits it), else None."""
        req = self.receiving.pop(msg.req_id, None)
        if req is None:
            return None
        rp = req.remote_prefill
        self.transfer_stats.kv_transfer_bytes += msg.num_bytes
        if msg.ok and not rp.aborted:
            self.transfer_stats.kv_transfers += 1
            self.transfer_stats.kv_transfer_seconds += msg.seconds
            self.transfer_stats.kv_exposed_seconds += msg.exposed_seconds
            req.remote_prefill = None
            self.running.append(req)
            if rp.migrated_tokens:  # a moving request: it decodes on from its last token
                req.num_computed_tokens = rp.migrated_tokens
                self.migration_stats.migrated_in += 1
                return None
            req.num_computed_tokens = len(req.prompt_token_ids)
            req.num_cached_tokens = msg.num_cached_tokens
            return req
        if rp.aborted:  # its abort was reported already; the blocks are free to go now
            self._drop_transfer(req)
            return None
        self.transfer_stats.kv_transfer_failures += 1
        self.transfer_stats.kv_recomputed += 1
        self.migration_stats.migration_failures += rp.migrated_tokens > 0
        self.blocks.free(req)
        req.remote_prefill = None
        req.num_computed_tokens = 0
        self._enqueue(req)  # compute the prompt here instead
        return None

    def prefill_lost(self, req_ids: list[str], why: str) -> None:
        """The prefill side cannot deliver these: cancel (then recompute) each one. (From a
        migration's target: it refused a request moving from here, which stays.)"""
        for rid in req_ids:
            if self.migration_refused(rid):  # a target refused a request moving from here
                continue
            req = self.requests.get(rid)
            if req is None or req.remote_prefill is None:
                continue
            if rid in self.receiving:
                self._cancel_receiving(req, abort_prefill=False)
            else:  # still queued here: just compute it locally
                req.remote_prefill = None

    def _cancel_receiving(self, req: Request, abort_prefill: bool = True) -> None:
        rp = req.remote_prefill
        if not rp.cancelling:
            rp.cancelling = True
            self.kv.to_agent.append(KVCancel(req.req_id))
            if abort_prefill and not rp.migrated_tokens:  # a moving request's source lets go on its agent's word
                self.kv.aborts.append((rp.address, req.req_id))

    def _drop_transfer(self, req: Request) -> None:
        """End a request whose abort was reported while its KV was in flight."""
        self.blocks.free(req)
        req.status = Status.FINISHED
        self.requests.pop(req.req_id, None)
        self.finished_since_report.append(req.req_id)

    def _as_tokenized(self, req: Request, reply_to: str = ""):
        return TokenizedRequest(req.req_id, list(req.prompt_token_ids), req.sampling, sorted(req.eos_token_ids),
                                req.arrival_time, req.priority, req.offline, reply_to, list(req.block_hashes),
                                self.blocks.block_size if req.block_hashes else 0)

    # -- prefill side ---------------------------------------------------------------------------
    def add_prefill(self, msg: PrefillRequest) -> None:
        """Queue a prefill for another instance (raises like ``add_request``); or, for a
        request moving from here, send its KV (``Migration.send_migrated``)."""
        if msg.migration:
            why = self.send_migrated(msg)
            if why:
                raise ValueError(why)
            return
        n = len(msg.request.prompt_token_ids)
        if len(msg.block_ids) * self.blocks.block_size < n:
            raise ValueError(f"the decode side gave {len(msg.block_ids)} blocks for {n} prompt tokens")
        one = msgspec.structs.replace(msg.request, sampling=msgspec.structs.replace(msg.request.sampling,
                                                                                    max_tokens=1))
        self.add_request(one)
        self.requests[one.req_id].remote_decode = RemoteDecode(msg.decode_instance, msg.decode_address,
                                                               msg.decode_agent, list(msg.block_ids))

    def on_step(self, req: Request) -> None:
        """``req``'s KV up to ``num_computed_tokens`` is computed by the step being planned:
        push the blocks it touches (a partial last block again next time)."""
        rd = req.remote_decode
        bs = self.blocks.block_size
        end = min(req.num_computed_tokens, len(req.prompt_token_ids))
        first, last = rd.num_blocks_sent, -(-end // bs)
        if last > first:
            self.kv.sends.append(KVSend(req.req_id, req.block_ids[first:last], rd.block_ids[first:last], rd.agent))
            rd.planned = True
        rd.num_blocks_sent = end // bs

    def on_finish(self, req: Request, token: int, logprobs) -> bool:
        """A request sampled its last token here: True to free its blocks now; False to hold
        them (a prefill for another instance: its agent has the rest to do)."""
        rd = req.remote_decode
        if rd is None:
            return True
        self._hold_for_agent(req)
        rd.deadline = time.monotonic() + self.kv_timeout_s
        self.kv.to_agent.append(KVSendDone(req.req_id, token, logprobs, max(req.num_cached_tokens, 0)))
        return False

    def _hold_for_agent(self, req: Request) -> None:
        """Take a prefill out of the running set; its blocks stay until the agent lets go."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
            self.tiers.release(req)
        self._forget_on_worker(req)
        req.status = Status.FINISHED
        self.sending[req.req_id] = req

    def kv_released(self, msg: KVReleased) -> None:
        """The agent is done with a prefill's blocks: free them now."""
        req = self.sending.pop(msg.req_id, None)
        if req is None:
            return
        rd = req.remote_decode
        if rd.migration:  # a request that moved: the target has its KV, or recomputes it
            if msg.ok:
                self.migration_stats.migrated_out += 1
            else:
                self.migration_stats.migration_failures += 1
            self.transfer_stats.kv_transfer_bytes += msg.num_bytes
            self.blocks.free(req)
            self.requests.pop(req.req_id, None)
            return
        if msg.ok:
            self.transfer_stats.kv_transfers += 1
            self.transfer_stats.kv_transfer_bytes += msg.num_bytes
            self.transfer_stats.kv_transfer_seconds += msg.seconds
        else:
            self.transfer_stats.kv_transfer_failures += 1
            if rd.notify:  # the decode side did not ask for this: it must compute the prompt itself
                self.kv.lost.append((rd.address, req.req_id, msg.error or "the transfer failed"))
        self.blocks.free(req)
        self.requests.pop(req.req_id, None)
        self.stats.num_finished += 1

    def cancel_prefill(self, req: Request, notify_decode: bool) -> bool:
        """End a prefill for another instance early (an abort, a preemption, a timeout).
        True if its blocks are held until the agent lets go; False if nothing was sent
        yet (the caller ends it as usual)."""
        rd = req.remote_decode
        if req.req_id not in self.sending and not rd.planned:
            return False
        if req.req_id not in self.sending:
            self._hold_for_agent(req)
        if not rd.cancelling:
            rd.cancelling, rd.notify = True, notify_decode
            self.kv.to_agent.append(KVCancel(req.req_id))
        return True

    # -- both -----------------------------------------------------------------------------------
    def abort_transfer(self, req: Request) -> bool:
        """Abort hook: True if ``req``'s blocks are held until its agent lets go (it ends
        then); False to end it now."""
        if req.req_id in self.receiving:
            req.remote_prefill.aborted = True
            self._cancel_receiving(req)
            return True
        if req.remote_decode is not None:
            return self.cancel_prefill(req, notify_decode=False)
        return False

    def expire_transfers(self, now: float) -> None:
        """Cancel transfers past their deadline (the decode side then recomputes)."""
        for req in list(self.receiving.values()):
            if not req.remote_prefill.cancelling and now > req.remote_prefill.deadline:
                self._cancel_receiving(req)
        for req in list(self.sending.values()):
            if not req.remote_decode.cancelling and now > req.remote_decode.deadline:
                self.cancel_prefill(req, notify_decode=True)

    def transfer_snapshot(self) -> dict:
        return {**self.transfer_stats.__dict__, "kv_transfers_in_flight": len(self.receiving) + len(self.sending)}
