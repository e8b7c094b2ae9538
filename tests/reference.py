"""transformers as the reference: greedy continuations and the near-tie rule."""

from __future__ import annotations

import asyncio
import math
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from xllm.sdk import AsyncClient

NEAR_TIE = 1e-4  # fp32: a top-2 logit gap this small is a tie
BF16_TIE_ULPS = 2  # bf16: a gap of at most this many bf16 steps at the top logit's size is a tie


def near_tie(top: float, gap: float, dtype: torch.dtype) -> bool:
    """Whether two logits ``gap`` apart (the larger ``top``) are a tie at ``dtype``: in bf16
    (8 significant bits) neighbouring logits of size 16..32 are 0.125 apart, so a gap of a
    step or two is below what the dtype can resolve."""
    if dtype == torch.bfloat16:
        step = 2.0 ** (math.floor(math.log2(max(abs(top), 1e-6))) - 7)
        return gap <= BF16_TIE_ULPS * step
    return gap < NEAR_TIE


@lru_cache(maxsize=4)
def hf_model(path: str, dtype: torch.dtype = torch.float32, q8_activations: bool = False):
    """transformers' own loading of the checkpoint: a directory, or a GGUF file (which
    transformers dequantizes itself). With ``q8_activations`` every linear's input is first
    rounded to Q8 blocks as ``xllm_cpu::q8_linear`` rounds it (``quantize_activations``):
    transformers' arithmetic for a server run with ``--quantization q8_0``."""
    p = Path(path)
    if p.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    if q8_activations:
        from xllm_ops.q8 import quantize_activations

        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda _, args: (quantize_activations(args[0]).to(args[0].dtype),))
    model.generation_config.eos_token_id = None  # compare fixed lengths: EOS is ignored
    return model


@torch.inference_mode()
def hf_greedy(path: str, prompt: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32,
              q8_activations: bool = False) -> list[int]:
    """transformers ``generate``, greedy, EOS ignored (``q8_activations``: see ``hf_model``)."""
    model = hf_model(str(path), dtype, q8_activations)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt])
    # NOTE: an explicit mask, or transformers treats every pad-id token in the prompt as padding
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def assert_greedy_equal(path: str, prompt: list[int], ours: list[int], ref: list[int],
                        dtype: torch.dtype = torch.float32, tie_dtype: torch.dtype | None = None,
                        q8_activations: bool = False) -> None:
    """Token-for-token equality, except a divergence at a near-tie the reference confirms:
    at the first differing position the top two reference logits (of the reference run in
    ``dtype``) are a tie at ``tie_dtype`` (``near_tie``; by default ``dtype``: within 1e-4 in
    fp32) and our token is one of them. Served in ``tie_dtype`` but compared with a reference
    in ``dtype``, our token may also be up to twice as far behind the top as the reference's
    own run in ``tie_dtype`` moves the top five logits there (bf16's error over a whole forward
    is many of its steps at the last logit). Tokens after an accepted divergence are not compared.
    ``q8_activations``: the reference of a Q8_0 server (see ``hf_model``)."""
    assert len(ours) == len(ref), f"length {len(ours)} != reference {len(ref)}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a == b:
            continue
        ids = torch.tensor([prompt + ref[:i]])
        logits = hf_model(str(path), dtype, q8_activations)(ids).logits[0, -1].float()
        top2 = logits.topk(2)
        gap = float(top2.values[0] - top2.values[1])
        if tie_dtype is None or tie_dtype == dtype:
            assert near_tie(float(top2.values[0]), gap, dtype) and a in top2.indices.tolist(), (
                f"diverged at output token {i}: ours {a}, reference {b}, top-2 gap {gap:.3g} "
                f"(not a near-tie)\nours {ours}\nref  {ref}")
            return
        # served in tie_dtype, compared with a reference in dtype: the reference's own run in
        # tie_dtype says how far that dtype's arithmetic moves these logits here
        moved = hf_model(str(path), tie_dtype, q8_activations)(ids).logits[0, -1].float()
        top = logits.topk(5).indices
        drift = float((moved[top] - logits[top]).abs().max())
        behind = float(top2.values[0] - logits[a])
        assert near_tie(float(top2.values[0]), behind, tie_dtype) or behind <= 2 * drift, (
            f"diverged at output token {i}: ours {a}, reference {b}, ours {behind:.3g} behind the top, "
            f"{tie_dtype} moves the top logits by up to {drift:.3g} here (not a near-tie)\nours {ours}\nref  {ref}")
        return


async def generate_all(address: str, prompts: list[list[int]], max_tokens: list[int],
                       **sampling) -> list[list[int]]:
    """Send every prompt at once (so they share engine steps); token ids back in order."""
    async with AsyncClient(address) as client:
        done = await asyncio.gather(*(
            client.generate(prompt_token_ids=p, max_tokens=n, temperature=0.0, ignore_eos=True, **sampling)
            for p, n in zip(prompts, max_tokens)))
    return [c.token_ids for c in done]
