"""The batched sampler and logits processors: distributions, not just shapes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from xllm.protocol import SamplingParams
from xllm.worker.logits_processors import apply_processors
from xllm.worker.sampler import Sampler, SamplingBatch, token_logprobs

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
V = LOGITS.numel()


def params(**kw) -> SamplingParams:
    base = dict(max_tokens=8, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)
    return SamplingParams(**{**base, **kw})


def draw(n: int, seed: int = 0, **kw) -> torch.Tensor:
    """Sample ``n`` rows of the same logits with the same parameters."""
    ps = [params(**kw)] * n
    batch = SamplingBatch.build(ps, [None] * n, V)
    return Sampler(seed)(LOGITS.repeat(n, 1), batch)


def frequencies(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).float() / tokens.numel()


def test_temperature_zero_and_top_k_one_are_greedy():
    assert (draw(500, temperature=0.0) == 0).all()
    assert (draw(500, top_k=1) == 0).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_samples_follow_the_tempered_softmax(temperature):
    got = frequencies(draw(40_000, temperature=temperature))
    want = torch.softmax(LOGITS / temperature, dim=0)
    assert torch.allclose(got, want, atol=0.01), (got, want)


def test_top_k_keeps_only_the_k_best_renormalised():
    got = frequencies(draw(40_000, top_k=2))
    want = torch.softmax(LOGITS[:2], dim=0)
    assert got[2:].sum() == 0
    assert torch.allclose(got[:2], want, atol=0.01)


def test_top_p_keeps_the_nucleus():
    probs = torch.softmax(LOGITS, dim=0)  # ~[0.61, 0.22, 0.14, 0.03, 0.004]
    got = frequencies(draw(40_000, top_p=0.8))
    assert got[2:].sum() == 0  # the first two already hold 0.83 >= 0.8
    assert torch.allclose(got[:2], probs[:2] / probs[:2].sum(), atol=0.01)


def test_min_p_drops_unlikely_tokens():
    got = frequencies(draw(20_000, min_p=0.2))  # keep p >= 0.2 * 0.61
    assert got[3:].sum() == 0 and got[2] > 0


def test_seeded_rows_repeat_and_differ_by_seed():
    def seeded(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        batch = SamplingBatch.build([params(seed=seed)], [g], V)
        return [int(Sampler(99)(LOGITS.view(1, -1), batch)) for _ in range(40)]

    assert seeded(1) == seeded(1)
    assert seeded(1) != seeded(2)


@dataclass
class Row:
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    eos_token_ids: list[int] = field(default_factory=list)


def test_presence_and_frequency_penalties_lower_repeated_tokens():
    row = Row([4, 1, 1, 2], 1, params(presence_penalty=0.5, frequency_penalty=0.25))
    out = apply_processors(LOGITS.clone().view(1, -1), [row])[0]
    # output tokens are [1, 1, 2]: token 1 twice, token 2 once, the prompt token 4 not at all
    assert out[1] == pytest.approx(LOGITS[1] - 0.5 - 2 * 0.25)
    assert out[2] == pytest.approx(LOGITS[2] - 0.5 - 0.25)
    assert out[0] == LOGITS[0] and out[4] == LOGITS[4]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    row = Row([0, 4], 1, params(repetition_penalty=2.0))
    out = apply_processors(LOGITS.clone().view(1, -1), [row])[0]
    assert out[0] == pytest.approx(LOGITS[0] / 2) and out[4] == pytest.approx(LOGITS[4] * 2)
    assert out[1] == LOGITS[1]


def test_logit_bias_and_min_tokens():
    rows = [Row([0], 1, params(logit_bias={3: 10.0})),
            Row([0], 1, params(min_tokens=2), eos_token_ids=[0]),
            Row([0, 1, 2], 1, params(min_tokens=2), eos_token_ids=[0])]
    out = apply_processors(LOGITS.repeat(3, 1), rows)
    assert out[0, 3] == pytest.approx(9.0) and out[0].argmax() == 3
    assert out[1, 0] == float("-inf")  # EOS banned before two outputs
    assert out[2, 0] == LOGITS[0]  # and allowed after


def test_logprobs_are_the_model_distribution():
    lp, ids, top = token_logprobs(LOGITS.view(1, -1), torch.tensor([2]), 3)
    ref = torch.log_softmax(LOGITS, dim=0)
    assert lp[0] == pytest.approx(float(ref[2]))
    assert ids[0].tolist() == [0, 1, 2]
    assert top[0].tolist() == pytest.approx(ref[:3].tolist())
