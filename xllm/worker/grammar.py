"""Constrained decoding on the worker: one grammar matcher per structured request.

The model runner calls four verbs and nothing else:

- ``add(req_id, so, output_tokens, end_ids)`` when it creates a request's state. A state
  created with output tokens already generated (preemption and recompute, or the decode
  side of prefill/decode disaggregation, whose first token the prefill instance sampled)
  feeds them to the fresh matcher first, so it stands where the request stands.
- ``drop(req_id)`` when the scheduler finishes the request.
- ``mask(logits, req_ids)`` after the logits processors, before sampling: one (R, V/32)
  bitmask for the R constrained rows of the step, filled by llguidance's executor in one
  batched call, applied in one op. A step without constrained rows returns at once.
- ``advance(req_ids, tokens)`` right after sampling: each matcher consumes its sampled
  token in the same step, so under async scheduling (step n+1 planned before step n's
  tokens are back; the worker fills the placeholders from its own samples) the next
  mask already follows from the token the worker itself put in the placeholder.

When the grammar is complete (the matcher is stopped) only the request's end ids (EOS and
``stop_token_ids``) may follow, so the request ends; while the grammar could end or go on
(a number after its last digit), the end ids are allowed beside what continues it.

NOTE: under tensor parallelism only rank 0 keeps matchers (``enabled``): its sampled
tokens are broadcast to the others, whose own samples are discarded.

Speculative decoding (not built): with k draft tokens d1..dk for a request, the target
rows need k+1 masks, mask i for the position after d1..d(i-1). Fill them with the
executor's draft variant (``unsafe_compute_mask_ptr_with_draft_token``: it walks the
matcher through the drafts and rolls it back itself), or by ``consume_tokens(d1..dk)``
(stopping at the first draft the grammar refuses: later masks stay empty) and
``rollback(k)``. Apply the masks to the target logits before rejection sampling, so a
refused draft is rejected like any other; then ``consume_tokens`` the accepted drafts and
the bonus token. ``rollback(n)`` undoes n consumed tokens (llguidance keeps the history),
which is also how a scheduler-side rejection after the fact would be undone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..protocol import StructuredOutput

log = logging.getLogger(__name__)

_NEG_INF_BITS = int(torch.tensor(float("-inf")).view(torch.int32).item())


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits`` (B, V) float32 to -inf, in place, wherever bit ``t % 32`` of
    ``bitmask[b, t // 32]`` ((B, ceil(V / 32)) int32) is 0.

    NOTE: branch-free on purpose: the 0/1 bits become 0/-1 int32 words that select, per
    element, the logit's own bits or those of -inf; ``masked_fill`` with a data-dependent
    mask was about 15 times slower at batch 32 on this CPU.
    """
    keep = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
    k = torch.from_numpy(keep).to(torch.int32).neg_()  # (B, V): -1 keep, 0 drop
    bits = logits.view(torch.int32)
    bits.bitwise_and_(k).bitwise_or_(k.bitwise_not_().bitwise_and_(_NEG_INF_BITS))


@dataclass
class _Row:
    matcher: object  # llguidance.LLMatcher (None when failed at creation)
    end_ids: list[int]  # tokens that end the request: EOS and stop_token_ids
    failed: bool = False  # the matcher refused a token: the request is ended at once


class GrammarRows:
    """The matchers of one worker's structured requests, keyed by request id.

    ``compiler`` is called once, on the first structured request, and returns an
    ``xllm.structured.GrammarCompiler`` (building one costs a vocabulary pass).
    """

    def __init__(self, compiler: Callable[[], object], enabled: bool = True, threads: int = 1) -> None:
        self._make_compiler = compiler
        self._compiler = None
        self._executor = None
        self._threads = threads
        self.enabled = enabled
        self.rows: dict[str, _Row] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, req_id: str, so: StructuredOutput | None, output_tokens: list[int], end_ids: list[int]) -> None:
        """Give ``req_id`` a fresh matcher for ``so`` (nothing when ``so`` is None) that has
        consumed ``output_tokens`` (the tokens the request generated before this state)."""
        if so is None or not self.enabled:
            return
        if self._compiler is None:
            import llguidance

            self._compiler = self._make_compiler()
            self._executor = llguidance.LLExecutor(num_threads=self._threads)
        try:
            row = _Row(self._compiler.matcher(so), sorted(set(end_ids)))
        except ValueError as exc:  # NOTE: the frontend refuses these; never let one stop a step
            log.error("request %s: grammar refused on the worker (%s); ending it", req_id, exc)
            self.rows[req_id] = _Row(None, sorted(set(end_ids)), failed=True)
            return
        tokens = [t for t in output_tokens if t not in row.end_ids]
        if tokens and not row.matcher.consume_tokens(tokens):
            log.warning("request %s: its earlier output does not match its grammar (%s); ending it",
                        req_id, row.matcher.get_error())
            row.failed = True
        self.rows[req_id] = row

    def drop(self, req_id: str) -> None:
        """Forget ``req_id`` (unknown ids are ignored)."""
        self.rows.pop(req_id, None)

    def mask(self, logits: torch.Tensor, req_ids: list[str]) -> None:
        """Mask ``logits`` (S, V) float32 in place: row i may only sample what the grammar
        of ``req_ids[i]`` allows next; rows of unconstrained requests are left alone."""
        if not self.rows:
            return
        picked = [(i, self.rows[r]) for i, r in enumerate(req_ids) if r in self.rows]
        if not picked:
            return
        n, vocab = len(picked), logits.shape[1]
        bitmask = torch.zeros(n, (vocab + 31) // 32, dtype=torch.int32)
        words = bitmask.numpy().view(np.uint32)
        live, ended = [], []
        for k, (_, row) in enumerate(picked):
            m = row.matcher
            if row.failed or m.is_stopped() or m.is_error():
                ended.append(k)
            else:
                live.append((m, k))
        if live:
            self._executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), bitmask.shape[1] * 4, n)
        for m, k in live:
            if m.is_accepting():  # the grammar may end here: so may the request
                _allow(words[k], picked[k][1].end_ids)
        for k in ended:  # NOTE: a request with no end ids at all (none known) is left free
            words[k] = 0 if picked[k][1].end_ids else 0xFFFFFFFF
            _allow(words[k], picked[k][1].end_ids)
        rows = [i for i, _ in picked]
        if n == logits.shape[0]:  # every row is constrained (rows are 0..n-1): in place
            apply_bitmask(logits, bitmask)
        else:
            index = torch.tensor(rows)
            part = logits[index]
            apply_bitmask(part, bitmask)
            logits[index] = part
        for k in ended:  # the end ids win over whatever banned them (min_tokens)
            logits[rows[k], picked[k][1].end_ids] = 0.0

    def advance(self, req_ids: list[str], tokens: list[int]) -> None:
        """Each constrained request consumes the token it sampled this step."""
        if not self.rows:
            return
        for rid, tok in zip(req_ids, tokens):
            row = self.rows.get(rid)
            if row is None or row.failed or tok in row.end_ids or row.matcher.is_stopped():
                continue  # an end id ends the request; the scheduler drops it
            if not row.matcher.consume_token(tok):
                log.warning("request %s: sampled token %d refused by its grammar (%s); ending it",
                            rid, tok, row.matcher.get_error())
                row.failed = True


def _allow(words: np.ndarray, token_ids: list[int]) -> None:
    """Set the bits of ``token_ids`` in one row of uint32 mask words."""
    for t in token_ids:
        if t // 32 < len(words):
            words[t // 32] |= np.uint32(1 << (t % 32))
