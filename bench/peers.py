"""The systems xllm is compared with, run in this process on the same checkpoint and dtype.

- ``hf_generate``: transformers ``generate`` on static batches (left padding, greedy, EOS
  ignored). A batch runs until its longest request is done; only the tokens each request
  asked for are counted.
- ``hf_continuous``: transformers continuous batching (the manager behind
  ``generate_batch``), fed request by request so each keeps its own output length.
- ``hf_decode_loop``: the plainest decode: one forward per token with a KV cache, argmax.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .common import BenchRequest
from .drive import progress


def load_hf(model_dir: Path, dtype: str = "auto"):
    """The transformers model of ``model_dir`` in its saved dtype (or ``dtype``), EOS switched off."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype != "auto" else "auto")
    model.eval()
    # NOTE: greedy with EOS ignored, like the xllm requests (ignore_eos=True).
    model.generation_config.eos_token_id = None
    model.generation_config.do_sample = False
    return model


def _pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    return int(pad if pad is not None else 0)


@torch.inference_mode()
def hf_generate(model, requests: list[BenchRequest], batch_size: int = 16) -> tuple[int, float]:
    """Static batches in submission order; returns (output tokens asked for, seconds)."""
    from transformers import GenerationConfig

    pad = _pad_id(model)
    bar = progress(len(requests), "transformers generate")
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.int64)
        mask = torch.zeros((len(batch), width), dtype=torch.int64)
        for row, r in enumerate(batch):  # left padding
            ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[row, width - len(r.prompt):] = 1
        new = max(r.max_tokens for r in batch)
        cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=pad)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        if out.shape[1] != width + new:
            raise RuntimeError(f"generate made {out.shape[1] - width} tokens, not {new}")
        bar.update(len(batch))
    wall = time.perf_counter() - t0
    bar.close()
    return sum(r.max_tokens for r in requests), wall


@torch.no_grad()  # NOTE: not inference_mode: the manager's thread updates its tensors in place
def hf_continuous(model, requests: list[BenchRequest], max_requests: int = 64, max_batch_tokens: int = 2048,
                  num_blocks: int | None = None) -> tuple[int, float]:
    """transformers continuous batching; returns (output tokens made, seconds).

    Sized like xllm's defaults (64 requests and 2,048 tokens per step). Left alone on a
    CPU it would take 90% of RAM for its cache and attend over all of it every step;
    ``num_blocks`` (pages of 256 tokens) defaults to what ``max_requests`` requests of
    the workload's mean length need.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    if num_blocks is None:
        mean_len = sum(len(r.prompt) + r.max_tokens for r in requests) / len(requests)
        num_blocks = max(4, math.ceil(min(max_requests, len(requests)) * mean_len / 256))
    cb_cfg = ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                                      max_requests_per_batch=max_requests)

    cfg = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=_pad_id(model),
                           max_new_tokens=max(r.max_tokens for r in requests))
    hints = WorkloadHints(max_prompt_length=max(len(r.prompt) for r in requests),
                          max_generated_length=cfg.max_new_tokens, num_requests=len(requests))
    bar = progress(len(requests), "transformers continuous batching")
    with model.continuous_batching_context_manager(generation_config=cfg, continuous_batching_config=cb_cfg,
                                                   block=True, timeout=5, workload_hints=hints) as manager:
        t0 = time.perf_counter()
        for i, r in enumerate(requests):
            manager.add_request(r.prompt, request_id=f"r{i}", max_new_tokens=r.max_tokens, eos_token_id=-1)
        tokens, done = 0, 0
        while done < len(requests):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous batching thread stopped")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"continuous batching failed a request: {result.error}")
                tokens += len(result.generated_tokens)
                done += 1
                bar.update(1)
        wall = time.perf_counter() - t0
    bar.close()
    asked = sum(r.max_tokens for r in requests)
    if tokens != asked:
        raise RuntimeError(f"continuous batching made {tokens} tokens, {asked} were asked for")
    return tokens, wall


@torch.inference_mode()
def hf_decode_loop(model, prompt: list[int], new_tokens: int) -> list[float]:
    """Greedy decode with ``past_key_values``; returns each token's time since the start (s)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    times = []
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        ids = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        int(ids)  # the token is known here
        times.append(time.perf_counter() - t0)
    return times
