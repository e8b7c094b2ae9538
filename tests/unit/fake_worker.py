"""A stand-in for the worker side of the step contract, for scheduler tests.

It keeps per-request tokens exactly as a real worker does and "samples" a token that
is a pure function of the request's tokens so far, so runs can be compared. A range past
the known tokens decodes on (multi-step), stopping where ``finish_reason`` ends it; with
``accept`` it stops after as many tokens as ``accept(req_id, tokens so far)`` allows, as
speculative decoding does when drafts are rejected (at least one token).
"""

from __future__ import annotations

from xllm.protocol import StepPlan, StepResult


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 1000 + 1


class FakeWorker:
    def __init__(self, accept=None) -> None:
        self.accept = accept
        self.tokens: dict[str, list[int]] = {}
        self.requests: dict[str, tuple] = {}  # req id -> (sampling, number of prompt tokens, eos ids)
        self.done: set[str] = set()
        self.new_seen: list[str] = []  # every NewRequestData received, in order

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_req_ids:
            self.tokens.pop(rid, None)
            self.done.discard(rid)
        for new in plan.new_requests:
            self.tokens[new.req_id] = list(new.token_ids)
            self.requests[new.req_id] = (new.sampling, new.num_prompt_tokens, new.eos_token_ids)
            self.done.discard(new.req_id)
            self.new_seen.append(new.req_id)
        ids, toks = [], []
        for rid, n, c in zip(plan.scheduled_req_ids, plan.num_scheduled, plan.num_computed):
            seq = self.tokens[rid]
            if rid in self.done:
                continue  # it ended in an earlier step; the scheduler drops it when it hears
            shift = max(0, c - (len(seq) - 1))  # an earlier step gave fewer tokens than planned
            assert shift == 0 or self.accept is not None, "plan starts past the tokens the worker knows"
            c -= shift
            sampling, n_prompt, eos = self.requests[rid]
            limit = c + n
            if self.accept is not None and c + n > len(seq):  # drafts: accept some, then one more
                limit = min(limit, len(seq) + self.accept(rid, len(seq)))
            while rid not in self.done and len(seq) <= limit:  # position p samples token p + 1
                tok = next_token(seq)
                seq.append(tok)
                ids.append(rid)
                toks.append(tok)
                if sampling.finish_reason(tok, len(seq) - n_prompt, eos):
                    self.done.add(rid)
        return StepResult(plan.step_id, ids, toks, 0.0)
