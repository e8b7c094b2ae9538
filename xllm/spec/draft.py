"""The ``draft`` proposer: a small model with the target's tokenizer runs ahead.

It is a second ``ModelRunner`` on the same worker, with its own weights, KV pool and
decode graphs. Its pool has the target's block count and block size and each request
uses the very block ids the target's does (the scheduler's table), so it needs no
bookkeeping of its own: a draft position's KV lives in the same block slot as the
target's.

To propose k tokens for a request of L known tokens, the draft runner gets one plan: the
positions from where its KV stops being right up to L - 1 (its prompt, the first time;
then the tokens accepted since), which samples d1, and k - 1 positions past them, which
it decodes on by itself (multi-step) into d2..dk. Drafts are greedy: verification treats
them as certain, so the output stays exactly the target's.

After verification the draft's KV is right up to the longest common prefix of what it
was fed (the known tokens and d1..d(k-1)) and the tokens the request really has; the
next plan starts there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import CacheConfig, ModelConfig, read_hf_config
from ..protocol import SamplingParams, StepPlan

if TYPE_CHECKING:
    from ..worker.model_runner import ModelRunner

_GREEDY = SamplingParams(max_tokens=1 << 30, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)


class DraftProposer:
    """``Proposer`` backed by a draft model's runner (verbs: add, extend, propose, drop)."""

    def __init__(self, target: "ModelRunner", model: ModelConfig, cache: CacheConfig,
                 graph_buckets: list[int] | None = None) -> None:
        from ..worker.model_runner import ModelRunner, RequestState

        self._state = RequestState
        hf = read_hf_config(model.path)
        if hf["vocab_size"] != target.spec.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({hf['vocab_size']} tokens) is not the target's "
                             f"({target.spec.vocab_size}): a draft model must share the tokenizer")
        self.target = target
        self.runner = ModelRunner(model, cache, hf, graph_buckets=graph_buckets)
        if self.runner.graphs is not None:
            self.runner.graphs.warm_up(progress=False)
        self.fed: dict[str, list[int]] = {}  # req id -> tokens whose KV the draft computed, in order
        self.known: dict[str, list[int]] = {}  # req id -> the request's real tokens
        self._step = 0

    # -- Proposer verbs ----------------------------------------------------------------------
    def add(self, req_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        self.known[req_id] = list(token_ids)
        self.fed[req_id] = []
        # NOTE: the block list is the target's own object: blocks it gains are the draft's too
        blocks = self.target.requests[req_id].block_ids
        self.runner.requests[req_id] = self._state(list(token_ids), blocks, _GREEDY, None,
                                                   num_prompt_tokens, [], False)

    def extend(self, req_id: str, token_ids: list[int]) -> None:
        self.known[req_id].extend(token_ids)

    def propose(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        ids, n_sched, n_comp = [], [], []
        for rid, k in wanted.items():
            known = self.known[rid]
            valid = _common_prefix(self.fed[rid], known)
            if valid == len(known):
                valid -= 1  # the last known token is always fed again: it samples d1
            self.runner.requests[rid].token_ids = list(known)
            ids.append(rid)
            n_comp.append(valid)
            n_sched.append(len(known) - valid + k - 1)
        self._step += 1
        result = self.runner.execute(StepPlan(self._step, [], {}, ids, n_sched, n_comp, []))
        drafts: dict[str, list[int]] = {rid: [] for rid in ids}
        for rid, tok in zip(result.req_ids, result.token_ids):
            drafts[rid].append(tok)
        for rid, k in wanted.items():
            drafts[rid] = drafts[rid][:k]
            self.fed[rid] = self.known[rid] + drafts[rid][:-1]
        return drafts

    def drop(self, req_id: str) -> None:
        self.known.pop(req_id, None)
        self.fed.pop(req_id, None)
        self.runner.requests.pop(req_id, None)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
