"""The scheduler's counters and moving means (the ``stats`` control call, the load
reports and ``/metrics`` read them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .request import Request


@dataclass
class SchedulerStats:
    """Counters kept across the scheduler's life (reported by the ``stats`` control call)."""

    num_steps: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    last_step_tokens: int = 0
    last_step_seqs: int = 0
    total_scheduled_tokens: int = 0
    total_prompt_tokens: int = 0
    total_output_tokens: int = 0
    num_continued_steps: int = 0  # decode steps workers ran from a plan after its first (multi-step)
    forward_seconds: float = 0.0  # the workers' time in forward passes and sampling, summed over steps
    spec_num_drafts: int = 0  # speculative decoding: requests' steps that verified drafts
    spec_draft_tokens: int = 0  # draft tokens proposed
    spec_accepted_tokens: int = 0  # draft tokens accepted
    spec_accepted_per_position: list = field(default_factory=list)  # [j]: drafts accepted at position j

    def observe_drafts(self, counts: dict) -> None:
        """Fold one step's (proposed, accepted) draft counts per request in."""
        for proposed, accepted in counts.values():
            self.spec_num_drafts += 1
            self.spec_draft_tokens += proposed
            self.spec_accepted_tokens += accepted
            per = self.spec_accepted_per_position
            per.extend([0] * (proposed - len(per)))
            for j in range(accepted):
                per[j] += 1
    ttft_s: float = 0.0  # moving mean of arrival -> first token
    tpot_s: float = 0.0  # moving mean of the gap between output tokens
    output_tokens: float = 0.0  # moving mean of a finished request's output tokens (0: none yet)

    def observe_finished(self, req: "Request") -> None:
        """Fold a finished request's output length into its mean (weight 1/16)."""
        n = req.num_output_tokens
        self.output_tokens = n if not self.output_tokens else self.output_tokens + (n - self.output_tokens) / 16

    def observe_token(self, req: "Request", now: float) -> None:
        """Fold one output token of ``req`` into the latency means (weight 1/16)."""
        if req.last_token_time is None:
            ttft = max(0.0, now - req.arrival_time)
            self.ttft_s = ttft if not self.ttft_s else self.ttft_s + (ttft - self.ttft_s) / 16
        else:
            gap = now - req.last_token_time
            self.tpot_s = gap if not self.tpot_s else self.tpot_s + (gap - self.tpot_s) / 16
        req.last_token_time = now
