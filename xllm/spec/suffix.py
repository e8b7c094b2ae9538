"""The ``suffix`` proposer: drafts from what followed the same tokens before.

After SuffixDecoding (Oliaro et al., 2024): every context of 1..``max_depth`` tokens seen
in a request's prompt and output counts the tokens that followed it. To propose, take
the longest context that ends the request's tokens and has been seen, pick its most
frequent continuation if that has at least ``min_prob`` of the counts, append it, and go
on from the new end, up to ``factor`` times the matched context's length (a long match
earns a long draft) and the step's limit. Optionally the outputs of recent requests
feed a shared index too (``global_requests``), for workloads that repeat themselves
across requests (the same code edited again, the same answer format).

Contexts are keyed by a rolling hash of their tokens, so a position costs ``max_depth``
dictionary updates. A hash collision can only make a draft wrong, and a wrong draft is
rejected by verification like any other.

Plain prompt lookup (n-gram) is the same proposer with ``min_match = n``, no probability
floor, no scaling and no shared index (``SuffixProposer.ngram``).
"""

from __future__ import annotations

from collections import OrderedDict

_MOD = (1 << 61) - 1
_BASE = 1_000_003


class SuffixIndex:
    """Continuation counts of every context of up to ``max_depth`` tokens of some sequences."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.next: dict[int, dict[int, int]] = {}  # context hash -> {next token: count}

    def feed(self, tokens: list[int], start: int, sign: int = 1) -> None:
        """Count ``tokens[i]`` after each context ending at ``i``, for ``i >= start`` (``sign``
        -1 takes them back)."""
        for i in range(max(start, 1), len(tokens)):
            tok = tokens[i]
            for key in _context_keys(tokens, i, self.max_depth):
                counts = self.next.setdefault(key, {})
                counts[tok] = counts.get(tok, 0) + sign
                if counts[tok] <= 0:
                    del counts[tok]
                    if not counts:
                        del self.next[key]

    def longest(self, tokens: list[int]) -> tuple[int, dict[int, int] | None]:
        """(length, continuation counts) of the longest seen context ending ``tokens``."""
        best: tuple[int, dict[int, int] | None] = (0, None)
        for m, key in enumerate(_context_keys(tokens, len(tokens), self.max_depth), 1):
            counts = self.next.get(key)
            if counts is None:
                break  # a longer context cannot have been seen either
            best = (m, counts)
        return best


def _context_keys(tokens: list[int], end: int, depth: int):
    """Hashes of ``tokens[end - m:end]`` for m = 1, 2, ... up to ``depth`` (and ``end``)."""
    h = 0
    scale = 1
    for j in range(end - 1, max(end - depth, 0) - 1, -1):
        h = (h + (tokens[j] + 1) * scale) % _MOD  # the context grows to the left
        scale = scale * _BASE % _MOD
        yield h ^ (end - j) << 62  # the length is part of the key


class SuffixProposer:
    """``Proposer`` from per-request suffix indexes and an optional shared one."""

    def __init__(self, max_depth: int = 24, min_prob: float = 0.1, factor: float = 1.0,
                 min_match: int = 1, global_requests: int = 0) -> None:
        self.max_depth = max_depth
        self.min_prob = min_prob
        self.factor = factor
        self.min_match = min_match
        self.tokens: dict[str, list[int]] = {}
        self.own: dict[str, SuffixIndex] = {}
        self.shared = SuffixIndex(max_depth) if global_requests else None
        self.recent: OrderedDict[str, list[int]] = OrderedDict()  # outputs in the shared index
        self.global_requests = global_requests
        self.num_prompt: dict[str, int] = {}

    @classmethod
    def ngram(cls, n: int = 3, max_depth: int = 8) -> "SuffixProposer":
        """Prompt lookup: the continuation of the last ``n``+ tokens seen before."""
        return cls(max_depth=max(n, max_depth), min_prob=0.0, factor=float("inf"), min_match=n)

    # -- Proposer verbs ----------------------------------------------------------------------
    def add(self, req_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        self.tokens[req_id] = list(token_ids)
        self.num_prompt[req_id] = num_prompt_tokens
        index = self.own[req_id] = SuffixIndex(self.max_depth)
        index.feed(self.tokens[req_id], 0)

    def extend(self, req_id: str, token_ids: list[int]) -> None:
        seq = self.tokens[req_id]
        start = len(seq)
        seq.extend(token_ids)
        self.own[req_id].feed(seq, start)

    def propose(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        return {rid: self.draft(rid, n) for rid, n in wanted.items()}

    def draft(self, req_id: str, max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens likely to follow the request's."""
        seq = self.tokens[req_id]
        draft: list[int] = []
        budget = max_tokens
        while len(draft) < budget:
            m, counts = self._match(req_id, seq + draft if draft else seq)
            if counts is None or m < self.min_match:
                break
            if not draft:
                budget = min(max_tokens, int(self.factor * m) if self.factor != float("inf") else max_tokens)
            tok, n = max(counts.items(), key=lambda kv: kv[1])
            if n < self.min_prob * sum(counts.values()):
                break
            draft.append(tok)
        return draft

    def drop(self, req_id: str) -> None:
        seq = self.tokens.pop(req_id, None)
        n_prompt = self.num_prompt.pop(req_id, 0)
        self.own.pop(req_id, None)
        if seq is None or self.shared is None:
            return
        output = seq[n_prompt:]
        self.shared.feed(output, 0)
        self.recent[req_id] = output
        while len(self.recent) > self.global_requests:
            _, old = self.recent.popitem(last=False)
            self.shared.feed(old, 0, sign=-1)

    def _match(self, req_id: str, seq: list[int]) -> tuple[int, dict[int, int] | None]:
        """The longer of the request's own match and the shared index's."""
        m, counts = self.own[req_id].longest(seq)
        if self.shared is not None:
            m2, counts2 = self.shared.longest(seq)
            if m2 > m:
                return m2, counts2
        return m, counts
