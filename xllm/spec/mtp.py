"""The ``mtp`` proposer: the checkpoint's own multi-token-prediction layer drafts.

The MTP layer (``xllm.models.mtp``) at position p reads the target's final hidden state
h_p and the token t_{p+1} and predicts t_{p+2}. Its attention keeps a KV cache of its
own (one layer; the target's block ids, like the draft model's pool), which must cover
every position before the one it predicts from.

Every forward of the target hands this proposer the hidden states of the positions it
computed (``ModelRunner.hidden_sink``). With L tokens known, the target has computed
the positions up to L - 2 with real tokens, so a proposal:

1. catches the MTP layer up over its positions ``done .. L - 2`` (t_{p+1} and h_p are
   all real there), which writes their KV and predicts t_L = d1;
2. chains: position L - 2 + j reads d_j and, for h, the MTP layer's own output at the
   position before, and predicts d_{j+1}. Those positions' KV is written again once the
   target has computed them for real.

Drafts are greedy (certain): verification keeps the target's distribution exactly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..config import CacheConfig
from ..models.loader import iter_weights
from ..models.mtp import MultiTokenPredictor
from ..worker.kv_cache import allocate_kv_cache
from ..worker.step_inputs import step_inputs

if TYPE_CHECKING:
    from ..worker.model_runner import ModelRunner

log = logging.getLogger(__name__)


class MTPProposer:
    """``Proposer`` from the target checkpoint's MTP layer (verbs: add, extend, propose, drop)."""

    def __init__(self, target: "ModelRunner", path: str, cache: CacheConfig) -> None:
        if target.spec.num_mtp_layers < 1:
            raise ValueError("--speculative mtp needs a checkpoint with a multi-token-prediction layer "
                             "(num_nextn_predict_layers in its config); this one has none")
        self.target = target
        self.mtp = MultiTokenPredictor(target.spec, target.model, target.dtype)
        self.mtp.load_weights(iter_weights(path, target.dtype))
        self.mtp.eval()
        self.mtp.prepare_for_serving()
        allocate_kv_cache(self.mtp.attention_layers(), cache.num_blocks + 1, cache.block_size, target.dtype)
        self.block_size = cache.block_size
        self.known: dict[str, list[int]] = {}
        self.done: dict[str, int] = {}  # req id -> MTP positions whose KV is right
        self.hidden: dict[str, dict[int, torch.Tensor]] = {}  # req id -> position -> h (hidden,)
        target.hidden_sink = self.observe

    # -- what the target computed --------------------------------------------------------------
    def observe(self, ids: list[str], num_computed: list[int], num_scheduled: list[int],
                hidden: torch.Tensor) -> None:
        """The target's final hidden states (T, hidden) of a forward, rows in request order."""
        row = 0
        for rid, c, n in zip(ids, num_computed, num_scheduled):
            rows = self.hidden.get(rid)
            if rows is not None:
                for j in range(n):
                    rows[c + j] = hidden[row + j]
            row += n

    # -- Proposer verbs ----------------------------------------------------------------------
    def add(self, req_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        self.known[req_id] = list(token_ids)
        self.done[req_id] = 0
        self.hidden[req_id] = {}

    def extend(self, req_id: str, token_ids: list[int]) -> None:
        self.known[req_id].extend(token_ids)

    def drop(self, req_id: str) -> None:
        self.known.pop(req_id, None)
        self.done.pop(req_id, None)
        self.hidden.pop(req_id, None)

    @torch.inference_mode()
    def propose(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        drafts: dict[str, list[int]] = {rid: [] for rid in wanted}
        ready = [rid for rid in wanted if self._caught_up(rid)]
        if not ready:
            return drafts
        blocks = [self.target.requests[rid].block_ids for rid in ready]
        shifted = [self.known[rid][1:] for rid in ready]  # MTP position p reads t_{p+1}
        lo = [self.done[rid] for rid in ready]
        hi = [len(self.known[rid]) - 1 for rid in ready]  # positions up to L - 2
        inp = step_inputs(ready, shifted, blocks, [h - l for l, h in zip(lo, hi)], lo, self.block_size)
        prev = torch.stack([self.hidden[rid][p] for rid, l, h in zip(ready, lo, hi) for p in range(l, h)])
        out = self.mtp(inp.input_ids, inp.positions, prev, inp.meta)[inp.sample_rows]  # (R, hidden)
        for rid, h in zip(ready, hi):
            self.done[rid] = h
            rows = self.hidden[rid]
            for p in [p for p in rows if p < h]:
                del rows[p]
        tokens = self.mtp.compute_logits(out).argmax(dim=-1).tolist()
        for rid, tok in zip(ready, tokens):
            drafts[rid].append(tok)
        for j in range(1, max(wanted[rid] for rid in ready)):
            chain = [i for i, rid in enumerate(ready) if wanted[rid] > j]
            ids = [ready[i] for i in chain]
            seqs = [shifted[i] + drafts[ready[i]] for i in chain]
            pos = [hi[i] - 1 + j for i in chain]  # MTP position L - 2 + j reads d_j
            inp = step_inputs(ids, seqs, [blocks[i] for i in chain], [1] * len(chain), pos, self.block_size)
            out = self.mtp(inp.input_ids, inp.positions, out[chain], inp.meta)
            for rid, tok in zip(ids, self.mtp.compute_logits(out).argmax(dim=-1).tolist()):
                drafts[rid].append(tok)
            ready, shifted, blocks, hi = ids, [shifted[i] for i in chain], [blocks[i] for i in chain], \
                [hi[i] for i in chain]
        return drafts

    def _caught_up(self, rid: str) -> bool:
        """Whether the target's hidden states of every position the MTP layer still needs
        are here (they are, unless the worker took steps this proposer did not see)."""
        rows, h = self.hidden[rid], len(self.known[rid]) - 1
        if self.done[rid] >= h:
            return False
        missing = [p for p in range(self.done[rid], h) if p not in rows]
        if missing:
            log.warning("MTP: request %s lacks the target's hidden states of %d positions: no drafts",
                        rid, len(missing))
            return False
        return True
