"""The scheduler's side of migration: a running request moves to another instance.

Source side. Once told where to move requests (``start_migrating``: a drain, or a role
change away from decode), every decoding request leaves the running set: no new step is
planned for it (``Status.MOVING``), and the steps in flight land as usual, their tokens
streamed from here. When none is left in flight, it is handed over (``MigratedRequest``
to the target, and ``moved`` in the next load report, so the routers send its abort
there). Its blocks stay held until the target pulls them: the target asks exactly as a
decode instance asks a prefill instance (``PrefillRequest`` with ``migration``), this
scheduler names the blocks to push (the transfer's ``sending`` side of ``disagg``), and
frees them on its agent's ``KVReleased``. An abort arriving after the hand-over is
forwarded to the target (``moved_to``). A target that refuses it sends it back (it runs
here again); one that has not pulled it within the KV transfer timeout gets an abort, and
the request ends with "abort" (its client is not left waiting, and never gets two streams).

Target side. ``add_migrated`` queues the request with its outputs; its computed tokens
come from elsewhere (``external_tokens``), so admission allocates their blocks and pulls
them (``after_allocate``); once they are in (``KVReceived``), it decodes on from its last
token. A transfer that fails is recomputed here (prompt and outputs), as after a
preemption: the output is the same either way (seeded sampling draws per output index).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from ..protocol import KVSend, KVSendDone, MigratedRequest, MigrationTarget, PrefillRequest
from .disagg import RemoteDecode, RemotePrefill
from .request import Request, Status

MOVED_MEMORY = 4096  # handed-over requests remembered (their aborts are forwarded)


@dataclass
class Leaving:
    """Source side: a request on its way out."""

    target: MigrationTarget
    handed: bool = False  # MigratedRequest sent: the target owns it
    deadline: float = 0.0  # monotonic; handed and not pulled by then: let go of its blocks


@dataclass
class MigrationStats:
    migrated_out: int = 0  # requests whose KV moved to another instance
    migrated_in: int = 0  # requests whose KV came from another instance
    migration_failures: int = 0  # transfers that failed (the target recomputed), or pulls never made


class Migration:
    """Mixed into ``Scheduler`` (see the module docstring). Expects of the scheduler the
    attributes and verbs ``Disaggregation`` does, plus ``_hold_for_agent``."""

    def _init_migration(self) -> None:
        self.migrate_targets: list[MigrationTarget] = []
        self.leaving: dict[str, Request] = {}  # source side: requests on their way out
        self._leaving: dict[str, Leaving] = {}
        self.moved_to: OrderedDict[str, str] = OrderedDict()  # handed over -> the target's address
        self.moved_since_report: dict[str, str] = {}  # handed over -> the target instance
        self.handed: list[tuple[str, MigratedRequest]] = []  # (target address, message) to send
        self.expired: list[Request] = []  # handed over, never pulled: ended ("abort" to stream)
        self.migration_stats = MigrationStats()
        self._next_target = 0

    # -- source side ------------------------------------------------------------------------
    def start_migrating(self, targets: list[MigrationTarget]) -> int:
        """Move every decoding request (now and from now on) to ``targets``, in turn; the
        number that start leaving now."""
        self.migrate_targets = list(targets)
        return self.advance_migrations(time.monotonic())

    def stop_migrating(self) -> None:
        """No more requests start leaving (those on their way finish moving)."""
        self.migrate_targets = []

    def movable(self, req: Request) -> bool:
        """A request decoding here for its own client (not a prompt still being computed,
        not a prefill for another instance, not waiting for its KV)."""
        return (req.status is Status.RUNNING and req.remote_decode is None and req.remote_prefill is None
                and bool(req.output_token_ids) and req.num_computed_tokens >= req.num_known_tokens - 1)

    def advance_migrations(self, now: float) -> int:
        """Start moving what may move; hand over what has no step in flight; end a handed
        request its target never pulled. Returns how many started leaving."""
        started = 0
        if self.migrate_targets:
            for req in [r for r in self.running if self.movable(r)]:
                target = self.migrate_targets[self._next_target % len(self.migrate_targets)]
                self._next_target += 1
                self.running.remove(req)
                req.status = Status.MOVING
                self.leaving[req.req_id] = req
                self._leaving[req.req_id] = Leaving(target)
                started += 1
        for rid, req in list(self.leaving.items()):
            state = self._leaving[rid]
            if not state.handed and req.num_placeholders == 0:
                self._hand_over(req, state, now)
            elif state.handed and now > state.deadline:  # the target never pulled it: end it, there too
                self.migration_stats.migration_failures += 1
                self.kv.aborts.append((state.target.address, rid))
                self.moved_to.pop(rid, None)
                self._let_go(req)
                self.expired.append(req)
        return started

    def _hand_over(self, req: Request, state: Leaving, now: float) -> None:
        if req.num_computed_tokens != req.num_known_tokens - 1 or not req.wants_more:
            self._stay(req)  # NOTE: cannot happen for a decoding request; keep it here if it does
            return
        state.handed = True
        state.deadline = now + self.kv_timeout_s
        msg = MigratedRequest(self._as_tokenized(req, req.reply_to), list(req.output_token_ids),
                              req.num_computed_tokens, self.instance_id, self.address,
                              max(req.num_cached_tokens, 0), req.queue_time or 0.0)
        self.handed.append((state.target.address, msg))
        self.moved_since_report[req.req_id] = state.target.instance_id
        self.moved_to[req.req_id] = state.target.address
        while len(self.moved_to) > MOVED_MEMORY:
            self.moved_to.popitem(last=False)

    def _stay(self, req: Request) -> None:
        """A request that was leaving stays: it runs here again."""
        self.leaving.pop(req.req_id, None)
        self._leaving.pop(req.req_id, None)
        req.status = Status.RUNNING
        self.running.append(req)

    def _let_go(self, req: Request) -> None:
        """Free a handed-over request's blocks (it is the target's; nothing is emitted)."""
        self.leaving.pop(req.req_id, None)
        self._leaving.pop(req.req_id, None)
        self._forget_on_worker(req)
        self.blocks.free(req)
        req.status = Status.FINISHED
        self.requests.pop(req.req_id, None)

    def take_handed(self) -> list[tuple[str, MigratedRequest]]:
        out, self.handed = self.handed, []
        return out

    def take_expired(self) -> list[Request]:
        out, self.expired = self.expired, []
        return out

    def take_moved(self) -> dict[str, str]:
        out, self.moved_since_report = self.moved_since_report, {}
        return out

    def migration_refused(self, req_id: str) -> bool:
        """The target refused a request handed to it: it runs here again. False if it is
        not one on its way out."""
        req = self.leaving.get(req_id)
        if req is None or not self._leaving[req_id].handed:
            return False
        self.migration_stats.migration_failures += 1
        self.moved_to.pop(req_id, None)
        self._stay(req)
        return True

    def send_migrated(self, msg: PrefillRequest) -> str:
        """The target pulls a handed-over request's KV: name its blocks to the agent. ""
        when under way, else why not (the target then recomputes it)."""
        rid = msg.request.req_id
        req = self.leaving.get(rid)
        if req is None or not self._leaving[rid].handed:
            return f"request {rid!r} is not moving from instance {self.instance_id}"
        n = req.num_computed_tokens
        last = -(-n // self.blocks.block_size)
        if len(msg.block_ids) < last:
            self.migration_stats.migration_failures += 1
            self._let_go(req)
            return f"the target gave {len(msg.block_ids)} blocks for {n} tokens"
        del self.leaving[rid], self._leaving[rid]
        req.remote_decode = RemoteDecode(msg.decode_instance, msg.decode_address, msg.decode_agent,
                                         list(msg.block_ids), num_blocks_sent=last, planned=True, migration=True)
        self._hold_for_agent(req)
        req.remote_decode.deadline = time.monotonic() + self.kv_timeout_s
        self.kv.moves.append(KVSend(rid, req.block_ids[:last], list(msg.block_ids[:last]), msg.decode_agent))
        self.kv.to_agent.append(KVSendDone(rid, -1))
        return ""

    def abort_leaving(self, req: Request) -> bool:
        """Abort hook: True if ``req`` was handed over (the abort is forwarded to its target,
        which ends it and streams the end; its blocks are let go here, or when its agent
        lets go); False to end it here as usual."""
        rd = req.remote_decode
        if rd is not None and rd.migration:  # being pulled: the target ends it, its agent lets go here
            self.kv.aborts.append((rd.address, req.req_id))
            return True
        state = self._leaving.get(req.req_id)
        if state is None or not state.handed:
            return False
        self.kv.aborts.append((state.target.address, req.req_id))
        self._let_go(req)
        return True

    # -- target side ------------------------------------------------------------------------
    def add_migrated(self, msg: MigratedRequest) -> None:
        """Queue a request moving here from another instance (raises like ``add_request``)."""
        n, out = len(msg.request.prompt_token_ids), len(msg.output_token_ids)
        if not out or msg.num_computed_tokens != n + out - 1:
            raise ValueError(f"a moving request holds KV for {msg.num_computed_tokens} of its {n + out} tokens; "
                             "only a decoding request (all but its last token) can move")
        if out >= msg.request.sampling.max_tokens:
            raise ValueError("the moving request has all its output tokens")
        if n + out >= self.max_model_len:
            raise ValueError(f"the moving request holds {n + out} tokens; the context is {self.max_model_len}")
        self.add_request(msg.request)
        self.moved_to.pop(msg.request.req_id, None)  # it is here again (it may have left before)
        req = self.requests[msg.request.req_id]
        self.stats.total_prompt_tokens -= n  # counted where it came in
        req.output_token_ids = list(msg.output_token_ids)
        req.num_cached_tokens = msg.num_cached_tokens
        req.queue_time = msg.queue_time
        req.last_token_time = time.time()
        req.remote_prefill = RemotePrefill(msg.source_instance, msg.source_address,
                                           migrated_tokens=msg.num_computed_tokens)

    def forward_abort(self, req_id: str) -> bool:
        """An abort for a request this instance does not hold: True if it was handed over
        (the abort goes on to where it went)."""
        address = self.moved_to.get(req_id)
        if address is None:
            return False
        self.kv.aborts.append((address, req_id))
        return True

    def migration_snapshot(self) -> dict:
        return {**self.migration_stats.__dict__, "migrations_in_flight": len(self.leaving),
                "migrating_to": [t.instance_id for t in self.migrate_targets]}
