"""In-process timing of one decode step, without any engine around it (W5 part A).

Two figures per batch size, on a ``ModelRunner`` built here:

- bare forward: ``runner.model(input_ids, positions, meta)`` + ``compute_logits`` on a
  hand-built all-decode batch (the floor any engine pays);
- runner step: ``runner.execute(plan)`` on a hand-built ``StepPlan`` (the same forward
  plus building the inputs from the plan and sampling), as the worker runs it.

The KV cache holds whatever was written (random prompts are never prefilled): the
timing of a decode step does not depend on the values.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

import torch

from xllm.config import CacheConfig, ModelConfig, read_hf_config
from xllm.layers.attention import AttentionMetadata
from xllm.protocol import NewRequestData, SamplingParams, StepPlan
from xllm.worker.model_runner import ModelRunner

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype ``xllm-launch --dtype auto`` picks for this checkpoint."""
    hf = read_hf_config(model_dir)
    saved = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    return "float32" if saved == "float32" else "bfloat16"


class DecodeBench:
    """A runner holding ``batch`` requests of ``context`` tokens each, ready to decode."""

    def __init__(self, model_dir: Path, batch: int, context: int, iters: int, block_size: int = 16) -> None:
        self.batch, self.context, self.bs = batch, context, block_size
        blocks_per_req = -(-(context + iters + 8) // block_size)
        hf = read_hf_config(model_dir)
        self.runner = ModelRunner(ModelConfig(str(model_dir), checkpoint_dtype(model_dir), context + iters + 64),
                                  CacheConfig(block_size, batch * blocks_per_req + 1), hf)
        rng = random.Random(batch)
        vocab = self.runner.spec.vocab_size
        self.ids = [f"r{i}" for i in range(batch)]
        self.tables = [list(range(i * blocks_per_req, (i + 1) * blocks_per_req)) for i in range(batch)]
        new = [NewRequestData(rid, [rng.randrange(vocab) for _ in range(context + 1)], blocks, GREEDY, context + 1)
               for rid, blocks in zip(self.ids, self.tables)]
        self.step = 0
        self.runner.execute(StepPlan(0, new, {}, self.ids, [1] * batch, [context] * batch, []))

    def runner_step(self) -> float:
        """Seconds of one ``execute`` of the next decode step of every request."""
        self.step += 1
        plan = StepPlan(self.step, [], {}, self.ids, [1] * self.batch, [self.context + self.step] * self.batch, [])
        t0 = time.perf_counter()
        self.runner.execute(plan)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def bare_forward(self) -> float:
        """Seconds of the model forward and the logits of one all-decode batch at ``context``."""
        b, pos = self.batch, self.context
        table = torch.tensor(self.tables, dtype=torch.int64)  # (B, M)
        slots = table[:, pos // self.bs] * self.bs + pos % self.bs  # (B,)
        meta = AttentionMetadata(slot_mapping=slots, decode_rows=torch.arange(b),
                                 decode_block_tables=table[:, : pos // self.bs + 1],
                                 decode_seq_lens=torch.full((b,), pos + 1, dtype=torch.int64),
                                 max_decode_len=pos + 1, all_decode=True)
        input_ids = torch.randint(0, self.runner.spec.vocab_size, (b,))
        positions = torch.full((b,), pos, dtype=torch.int64)
        model = self.runner.model
        t0 = time.perf_counter()
        hidden = model(input_ids, positions, meta)
        model.compute_logits(hidden)
        return time.perf_counter() - t0


def time_decode(model_dir: Path, batch: int, context: int, iters: int = 20, warmup: int = 3) -> dict:
    """Median seconds of the bare forward and of the runner step at ``batch`` x ``context``.

    The two are interleaved so drift on a noisy machine hits both alike.
    """
    bench = DecodeBench(model_dir, batch, context, iters + warmup)
    bare, step = [], []
    for i in range(iters + warmup):
        b, s = bench.bare_forward(), bench.runner_step()
        if i >= warmup:
            bare.append(b)
            step.append(s)
    return {"bare": statistics.median(bare), "runner": statistics.median(step)}
