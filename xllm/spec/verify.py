"""Checking drafts against the target model: which of a request's k draft tokens to keep.

The target's forward over ``last token, d1..dk`` gives k+1 rows of logits; row j is the
target's distribution p_j for the token after d1..dj (all of the request's sampling
parameters applied: processors, temperature, top-k/p, min-p).

- Greedy: keep drafts while each equals the arg-max of its row; then the arg-max of the
  first row that disagrees (or of the last row, when all k agree): 1..k+1 tokens, the
  exact tokens plain greedy decoding gives.
- Sampled: keep d_j with probability min(1, p_j(d_j) / q_j(d_j)), where q is the
  proposer's distribution (a model-free draft is certain: q_j(d_j) = 1); at the first
  rejection draw from the residual max(0, p_j - q_j), normalised, and stop; when all k are
  kept draw one more from p_k. The output's distribution is then exactly the target's
  (Leviathan et al., 2023; Chen et al., 2023), token by token.
"""

from __future__ import annotations

from typing import Callable

import torch


def verify_greedy(argmax: list[int], drafts: list[int]) -> list[int]:
    """Tokens kept from ``drafts`` given each row's arg-max (``len(drafts) + 1`` of them)."""
    a = 0
    while a < len(drafts) and argmax[a] == drafts[a]:
        a += 1
    return drafts[:a] + [argmax[a]]


def verify_sampled(probs: torch.Tensor, drafts: list[int], generator: Callable[[int], torch.Generator],
                   draft_probs: torch.Tensor | None = None) -> list[int]:
    """Tokens kept by rejection sampling. ``probs`` (k+1, V): the target's rows;
    ``draft_probs`` (k, V): the proposer's, None for a certain draft; ``generator(j)``: the
    generator for the request's j-th token of this step (seeded per output token)."""
    out: list[int] = []
    for j, d in enumerate(drafts):
        gen = generator(j)
        p = probs[j]
        q = 1.0 if draft_probs is None else float(draft_probs[j, d])
        u = float(torch.rand((), generator=gen))
        if q > 0 and u * q < float(p[d]):  # u < p / q, without dividing by a tiny q
            out.append(d)
            continue
        residual = p.clone()
        if draft_probs is None:
            residual[d] = 0.0
        else:
            residual = (residual - draft_probs[j]).clamp_min_(0.0)
        out.append(_draw(residual, gen))
        return out
    out.append(_draw(probs[len(drafts)], generator(len(drafts))))
    return out


def _draw(weights: torch.Tensor, gen: torch.Generator) -> int:
    """A token drawn in proportion to ``weights`` (V,), which need not sum to one."""
    if float(weights.sum()) <= 0.0:  # nothing left (a draft the target was sure of): its arg-max
        return int(weights.argmax())
    noise = torch.empty_like(weights).exponential_(generator=gen)
    return int((weights / noise).argmax())
