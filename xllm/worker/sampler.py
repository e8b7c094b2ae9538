"""Batched sampling on the worker: logits never leave it, only token ids do.

Greedy rows take the arg-max. Other rows apply temperature, top-k, top-p and min-p as
masks over one sort of the batch, then draw with the exponential race
(``argmax(p / E)``, ``E ~ Exp(1)``), which samples from ``p`` exactly. Rows with a
seed draw ``E`` from their own generator, so the same seed gives the same output.

NOTE (invariant): a seeded request's noise for output token ``n`` depends only on
(seed, n) (``seed_for_token``), not on how many draws came before. A request that was
preempted and recomputed, or moved to another worker, therefore samples the same tokens
as one that never was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..protocol import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per step."""

    temperature: torch.Tensor  # (B,) 0 for greedy rows
    top_k: torch.Tensor  # (B,) int64, vocab size when off
    top_p: torch.Tensor  # (B,)
    min_p: torch.Tensor  # (B,)
    generators: list[torch.Generator | None]  # per row; None draws from the shared one
    all_greedy: bool
    needs_sort: bool  # some row uses top-k or top-p

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None],
              vocab_size: int) -> "SamplingBatch":
        temps = [p.temperature for p in params]
        all_greedy = all(t == 0.0 or p.top_k == 1 for t, p in zip(temps, params))
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        top_p = [p.top_p for p in params]
        return cls(
            temperature=torch.tensor(temps, dtype=torch.float32),
            top_k=torch.tensor(top_k, dtype=torch.int64),
            top_p=torch.tensor(top_p, dtype=torch.float32),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32),
            generators=generators,
            all_greedy=all_greedy,
            needs_sort=any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p),
        )


_MASK = 2**64 - 1


def seed_for_token(gen: torch.Generator, seed: int, n: int) -> None:
    """Seed ``gen`` for a request's ``n``-th output token (splitmix64 of seed and n)."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    gen.manual_seed(z ^ (z >> 31))


class Sampler:
    """Turns (B, V) float32 logits into (B,) token ids."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy
        is_greedy = (batch.temperature == 0.0) | (batch.top_k == 1)
        probs = self.probs(logits, batch, normalize=False)
        noise = torch.empty_like(probs)
        shared = [i for i, g in enumerate(batch.generators) if g is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1]).exponential_(generator=self.generator)
        for i, g in enumerate(batch.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(is_greedy, greedy, sampled)

    def probs(self, logits: torch.Tensor, batch: SamplingBatch, normalize: bool = True) -> torch.Tensor:
        """The distribution each row samples from (B, V): temperature, then top-k and top-p,
        then min-p. Greedy rows come out at temperature 1 (their callers take the arg-max)."""
        is_greedy = (batch.temperature == 0.0) | (batch.top_k == 1)
        temp = torch.where(is_greedy, torch.ones_like(batch.temperature), batch.temperature)
        logits = logits / temp.unsqueeze(1)
        if batch.needs_sort:
            logits = self._top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = torch.softmax(logits, dim=-1)
        if bool((batch.min_p > 0).any()):
            keep = probs >= batch.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs * keep
            if normalize:
                probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        v = logits.shape[1]
        ranks = torch.arange(v).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(1)  # beyond top-k
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p.unsqueeze(1)  # the nucleus is already full
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """Log-probabilities under the model's own distribution (before temperature and
    penalties): the chosen tokens' (R,) and the top-k (R, k) ids and values, as numpy."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.view(-1, 1)).squeeze(1)
    top = lp.topk(k, dim=-1) if k else None
    top_ids = top.indices.to(torch.int32) if top is not None else torch.empty(len(tokens), 0, dtype=torch.int32)
    top_lp = top.values if top is not None else torch.empty(len(tokens), 0)
    return chosen.numpy(), top_ids.numpy(), top_lp.float().numpy()
