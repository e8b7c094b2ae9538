"""An instance's service times as functions of its work: fitted from what its workers
measured at start (``xllm.worker.profiler``), used by the router to predict TTFT and TPOT
(``xllm.router.slo``), by the adaptive PD controller to size the prefill and decode pools
(``xllm.router.adaptive``), and by the simulator as its instances' clock (``bench.sim``).

Two laws, in seconds (the coefficients are an ``InstanceProfile``):

- prefill of a prompt of ``L`` tokens whose first ``a`` are cached, as the scheduler runs
  it (chunk by chunk): ``p0 + p1·(L − a) + p2·(L² − a²)``. The quadratic term is attention
  over the context so far; ``a = 0`` is xLLM's TTFT law, a quadratic in the prompt length.
- one decode step of ``B`` requests holding ``C`` context tokens in all
  (``C = B × mean context``): ``d0 + d1·B + d2·C``, xLLM's ``c0 + c1·batch + c2·batch·context``.

Fitting is least squares on relative errors (every sample counts alike, short prompts as
much as long ones), with coefficients held at zero or above (a negative cost would
predict a faster step for more work); the error reported is the relative RMS over the
samples. Only numpy: the router imports this.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .protocol import InstanceProfile

# Service times assumed for an instance whose profile is not known yet (it has not
# measured, or it runs with --no-instance-profile): it ranks by its load, as prefill
# tokens and decode batch, and its predictions are guesses.
NOMINAL = InstanceProfile((0.0, 1e-3, 0.0), (0.01, 1e-3, 1e-6))


def fit_nonnegative(design: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, float]:
    """Coefficients ``c >= 0`` minimising ``sum(((design @ c) / seconds - 1) ** 2)``, and the
    relative RMS error of the fit. A coefficient least squares would make negative is held
    at zero and the rest refitted (an active set: there are at most three)."""
    design = np.asarray(design, dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    if len(seconds) == 0 or np.any(seconds <= 0):
        raise ValueError("a fit needs samples, every one of positive duration")
    weighted = design / seconds[:, None]
    free = list(range(design.shape[1]))
    coef = np.zeros(design.shape[1])
    while free:
        sol, *_ = np.linalg.lstsq(weighted[:, free], np.ones(len(seconds)), rcond=None)
        if np.all(sol >= 0):
            coef[:] = 0.0
            coef[free] = sol
            break
        free.pop(int(np.argmin(sol)))
    error = float(np.sqrt(np.mean((design @ coef / seconds - 1.0) ** 2)))
    return coef, error


def prefill_design(lengths: Sequence[int]) -> np.ndarray:
    """Rows (1, L, L²) of the prefill law."""
    n = np.asarray(lengths, dtype=np.float64)
    return np.stack([np.ones_like(n), n, n * n], axis=1)


def decode_design(batches: Sequence[int], contexts: Sequence[int]) -> np.ndarray:
    """Rows (1, B, C) of the decode law; ``contexts`` are each step's context tokens in all."""
    b = np.asarray(batches, dtype=np.float64)
    return np.stack([np.ones_like(b), b, np.asarray(contexts, dtype=np.float64)], axis=1)


def fit_profile(prefill_samples: Sequence[tuple[int, float]], decode_samples: Sequence[tuple[int, int, float]],
                threads: int = 1, seconds: float = 0.0) -> InstanceProfile:
    """The profile from (prompt tokens, seconds) and (batch, context tokens in all, seconds)
    samples."""
    lengths, t_pre = zip(*prefill_samples)
    batches, contexts, t_dec = zip(*decode_samples)
    pre, pre_err = fit_nonnegative(prefill_design(lengths), np.asarray(t_pre))
    dec, dec_err = fit_nonnegative(decode_design(batches, contexts), np.asarray(t_dec))
    return InstanceProfile(tuple(float(x) for x in pre), tuple(float(x) for x in dec), pre_err, dec_err,
                           max(lengths), max(batches), max(contexts), threads, seconds)


class ServiceModel:
    """Predicted service times of one instance (see the module docstring for the laws)."""

    __slots__ = ("p0", "p1", "p2", "d0", "d1", "d2")

    def __init__(self, profile: InstanceProfile) -> None:
        self.p0, self.p1, self.p2 = profile.prefill
        self.d0, self.d1, self.d2 = profile.decode

    def prefill_s(self, length: int, cached: int = 0) -> float:
        """Seconds to prefill a prompt of ``length`` tokens whose first ``cached`` are in the cache."""
        new = length - cached
        if new <= 0:
            return 0.0
        return self.p0 + self.p1 * new + self.p2 * (length * length - cached * cached)

    def prefill_tokens_s(self, tokens: int) -> float:
        """Seconds to prefill ``tokens`` queued tokens of unknown prompts, at the linear rate
        (a backlog: the per-prompt and quadratic terms are counted per request, where known)."""
        return self.p1 * tokens

    def backlog_s(self, requests: int, tokens: int) -> float:
        """Seconds to prefill ``requests`` queued prompts of ``tokens`` in all, taken as equally
        long (a queue is known by its totals)."""
        if requests <= 0 or tokens <= 0:
            return 0.0
        return self.p0 * requests + self.p1 * tokens + self.p2 * tokens * tokens / requests

    def decode_step_s(self, batch: int, context: int) -> float:
        """Seconds of one decode step of ``batch`` requests holding ``context`` tokens in all
        (0 for an empty batch)."""
        return self.d0 + self.d1 * batch + self.d2 * context if batch > 0 else 0.0
