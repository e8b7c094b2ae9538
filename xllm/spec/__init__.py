"""Speculative decoding: proposers guess a request's next tokens, the target model checks
them all in one forward pass, and the longest acceptable prefix plus one token of the
target's own is kept (``verify``), so a step yields 1..k+1 tokens for one read of the
weights.

Where it sits in the step contract: the scheduler plans a decoding request a range of
``1 + k`` positions past its known tokens (its KV allocated, the tokens counted in the
step's budget). A worker with a proposer fills those positions with drafts, runs them
as one chunk and returns however many tokens were accepted; the scheduler settles the
shortfall (``Scheduler._settle``). Proposers live on the worker because it alone holds
each request's newest tokens under async scheduling (and a draft model's weights).

Proposers (``Proposer``): ``suffix`` and ``ngram`` (model-free: the request's own prompt
and output, and recent requests, ``suffix.py``); ``draft`` (a small model with the same
tokenizer, run on the same worker with its own KV pool and graphs, ``draft.py``); ``mtp``
(the checkpoint's own multi-token-prediction layer, fed the target's hidden states,
``mtp.py``).
"""

from __future__ import annotations

from typing import Protocol


class Proposer(Protocol):
    """Guesses what follows each request's tokens. Verbs: add, extend, propose, drop.

    NOTE: drafts are certain guesses (no distribution comes with them): verification keeps
    a draft with the target's own probability of it, which keeps the output exactly the
    target's for any proposer.
    """

    def add(self, req_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        """A request the worker starts holding, with its prompt and any outputs so far."""

    def extend(self, req_id: str, token_ids: list[int]) -> None:
        """Tokens the request gained (accepted or sampled), in order."""

    def propose(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        """For each request id, up to ``wanted[req_id]`` likely next tokens (maybe none)."""

    def drop(self, req_id: str) -> None:
        """The request ended or left this worker."""


def make_proposer(method: str, **kw) -> Proposer | None:
    """The proposer of ``--speculative METHOD`` (None when off); ``kw`` for ``draft``: the
    draft model's runner settings (``xllm.spec.draft.DraftProposer``)."""
    if not method:
        return None
    if method == "suffix":
        from .suffix import SuffixProposer

        return SuffixProposer(global_requests=64)
    if method == "ngram":
        from .suffix import SuffixProposer

        return SuffixProposer.ngram()
    if method == "draft":
        from .draft import DraftProposer

        return DraftProposer(**kw)
    if method == "mtp":
        from .mtp import MTPProposer

        return MTPProposer(**kw)
    raise ValueError(f"unknown speculative method {method!r}")
