"""A stand-in for the worker side of the step contract, for scheduler tests.

It keeps per-request tokens exactly as a real worker does and "samples" a token that
is a pure function of the request's tokens so far, so runs can be compared.
"""

from __future__ import annotations

from xllm.protocol import StepPlan, StepResult


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 1000 + 1


class FakeWorker:
    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.new_seen: list[str] = []  # every NewRequestData received, in order

    def execute(self, plan: StepPlan) -> StepResult:
        for rid in plan.finished_req_ids:
            self.tokens.pop(rid, None)
        for new in plan.new_requests:
            self.tokens[new.req_id] = list(new.token_ids)
            self.new_seen.append(new.req_id)
        ids, toks = [], []
        for rid, n, c in zip(plan.scheduled_req_ids, plan.num_scheduled, plan.num_computed):
            seq = self.tokens[rid]
            assert c + n <= len(seq), "plan runs past the tokens the worker knows"
            if c + n == len(seq):
                tok = next_token(seq)
                seq.append(tok)
                ids.append(rid)
                toks.append(tok)
        return StepResult(plan.step_id, ids, toks, 0.0)
