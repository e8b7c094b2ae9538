"""GGUF checkpoints through the whole stack equal transformers' own loading of the same
file (transformers dequantizes GGUF too), token for token: the real SmolLM2 file and small
random models written to GGUF here, in fp32 and bf16."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from tests.deploy import launch
from tests.reference import assert_greedy_equal, generate_all, hf_greedy
from xllm.models.gguf import GGUFError, read_config
from xllm.models.loader import gguf_path, load_tokenizer
from xllm.sdk import AsyncClient
from xllm_tools.gguf_export import export_gguf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUESTIONS = ["What is the capital of France? Answer in one sentence.",
             "Write a haiku about the sea.", "List three prime numbers.", "Hi!"]


@pytest.fixture(scope="module")
def random_gguf(make_tiny, tmp_path_factory):
    def write(preset: str, quant: str):
        return export_gguf(make_tiny(preset), tmp_path_factory.mktemp(preset) / f"{preset}.{quant}.gguf", quant)

    return write


@pytest.mark.parametrize("preset,quant,dtype", [("tiny-llama", "Q8_0", "float32"), ("tiny-qwen2", "Q8_0", "float32"),
                                                ("tiny-llama", "Q4_0", "bfloat16"), ("tiny-qwen2", "F32", "bfloat16")])
def test_random_gguf_equals_transformers(random_gguf, tmp_path, preset, quant, dtype):
    path = random_gguf(preset, quant)
    rng = random.Random(7)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (1, 9, 40, 130)]
    lens = [24, 17, 30, 12]
    with launch(path, tmp_path, "--dtype", dtype) as dep:
        ours = asyncio.run(generate_all(dep.address, prompts, lens))
    for prompt, n, out in zip(prompts, lens, ours):
        ref = hf_greedy(str(path), prompt, n, DTYPES[dtype])
        assert_greedy_equal(str(path), prompt, out, ref, DTYPES[dtype])


async def _chat_both_ways(address: str, prompts: list[list[int]]) -> tuple[list, list]:
    """Each question as chat messages (our chat template path) and as the reference's ids."""
    async with AsyncClient(address) as c:
        by_messages = await asyncio.gather(*(
            c.generate(messages=[{"role": "user", "content": q}], max_tokens=32, temperature=0.0, ignore_eos=True)
            for q in QUESTIONS))
        by_ids = await asyncio.gather(*(
            c.generate(prompt_token_ids=p, max_tokens=32, temperature=0.0, ignore_eos=True) for p in prompts))
    return by_messages, by_ids


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_gguf_equals_transformers(smollm2, tmp_path, dtype):
    path = gguf_path(smollm2)
    tok = load_tokenizer(smollm2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in QUESTIONS]
    with launch(smollm2, tmp_path, "--dtype", dtype, "--enforce-eager") as dep:
        by_messages, by_ids = asyncio.run(_chat_both_ways(dep.address, prompts))
    for prompt, m, i in zip(prompts, by_messages, by_ids):
        assert m.num_prompt_tokens == len(prompt)
        ref = hf_greedy(str(path), prompt, 32, DTYPES[dtype])
        # Both ways equal the reference on the reference's prompt ids, so the template renders alike. They are
        # compared to it one by one, not to each other: the two runs batch differently, and in bf16 a near tie
        # may go either way between batch shapes.
        assert_greedy_equal(str(path), prompt, i.token_ids, ref, DTYPES[dtype])
        assert_greedy_equal(str(path), prompt, m.token_ids, ref, DTYPES[dtype])
    assert "Paris" in by_messages[0].text


def test_a_directory_holding_one_gguf_is_that_model(random_gguf, tmp_path):
    path = random_gguf("tiny-llama", "Q8_0")
    assert gguf_path(path.parent) == path
    (path.parent / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="several GGUF files"):
        gguf_path(path.parent)


def test_unsupported_architecture_is_named(random_gguf, tmp_path):
    import gguf

    out = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(out), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported"):
        read_config(out)


def test_unsupported_quant_type_is_named(random_gguf, tmp_path):
    import gguf
    import numpy as np

    from xllm.models.loader import iter_weights

    src = gguf.GGUFReader(str(random_gguf("tiny-llama", "Q8_0")))
    out = tmp_path / "q8_1.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    for field in src.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            w.add_key_value(field.name, field.contents(), field.types[0],
                            sub_type=field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    w.add_tensor("token_embd.weight", np.zeros((1024, 64 // block * size), dtype=np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="token_embd.weight is stored as Q8_1"):
        list(iter_weights(out, torch.float32))
