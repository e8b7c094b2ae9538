"""Per-request changes to the logits before sampling, applied to the whole batch at once:
logit bias, repetition / presence / frequency penalties, and the end-of-sequence ban
before ``min_tokens``.

- presence: ``logit -= presence_penalty`` for every token already in the output;
- frequency: ``logit -= frequency_penalty * count`` of the token in the output;
- repetition: for tokens in the prompt or output, positive logits are divided by
  ``repetition_penalty`` and negative ones multiplied (the CTRL rule).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..protocol import SamplingParams


class RowState(Protocol):
    """What the processors need of one request (the worker's ``RequestState`` is one)."""

    token_ids: list[int]  # prompt and output so far
    num_prompt_tokens: int
    eos_token_ids: list[int]  # empty when the request ignores EOS
    sampling: SamplingParams


def _padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out


def apply_processors(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Return ``logits`` (B, V) with every request's processors applied (in place)."""
    v = logits.shape[1]
    _apply_bias(logits, rows)
    _apply_penalties(logits, rows, v)
    _apply_min_tokens(logits, rows)
    return logits


def _apply_bias(logits: torch.Tensor, rows: list[RowState]) -> None:
    idx_r, idx_t, vals = [], [], []
    for i, r in enumerate(rows):
        for tok, bias in r.sampling.logit_bias.items():
            idx_r.append(i)
            idx_t.append(tok)
            vals.append(bias)
    if idx_r:
        logits.index_put_((torch.tensor(idx_r), torch.tensor(idx_t)), torch.tensor(vals), accumulate=True)


def _apply_penalties(logits: torch.Tensor, rows: list[RowState], v: int) -> None:
    chosen = [i for i, r in enumerate(rows)
              if r.sampling.presence_penalty or r.sampling.frequency_penalty
              or r.sampling.repetition_penalty != 1.0]
    if not chosen:
        return
    sub = [rows[i] for i in chosen]
    idx = torch.tensor(chosen)
    out_ids = _padded([r.token_ids[r.num_prompt_tokens:] for r in sub], v)  # v = padding slot
    counts = torch.zeros(len(sub), v + 1).scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float32))[:, :v]
    part = logits[idx]
    presence = torch.tensor([r.sampling.presence_penalty for r in sub]).unsqueeze(1)
    frequency = torch.tensor([r.sampling.frequency_penalty for r in sub]).unsqueeze(1)
    part -= presence * (counts > 0) + frequency * counts
    rep = torch.tensor([r.sampling.repetition_penalty for r in sub]).unsqueeze(1)
    if bool((rep != 1.0).any()):
        all_ids = _padded([r.token_ids for r in sub], v)
        seen = torch.zeros(len(sub), v + 1, dtype=torch.bool).scatter_(1, all_ids, True)[:, :v]
        penalised = torch.where(part > 0, part / rep, part * rep)
        part = torch.where(seen, penalised, part)
    logits[idx] = part


def _apply_min_tokens(logits: torch.Tensor, rows: list[RowState]) -> None:
    idx_r, idx_t = [], []
    for i, r in enumerate(rows):
        sp = r.sampling
        if sp.min_tokens and len(r.token_ids) - r.num_prompt_tokens < sp.min_tokens:
            banned = set(sp.stop_token_ids) | set(r.eos_token_ids)
            idx_r.extend([i] * len(banned))
            idx_t.extend(banned)
    if idx_r:
        logits[torch.tensor(idx_r), torch.tensor(idx_t)] = float("-inf")
