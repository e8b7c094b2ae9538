"""GGUF checkpoints (llama.cpp's file format), read with the ``gguf`` package.

A GGUF file holds the config as metadata keys (``llama.block_count``, ...), the
tokenizer (vocabulary, merges, chat template) and the tensors, many of them quantized.
Here the metadata becomes a ``config.json``-shaped dict, the tokenizer comes from
transformers' GGUF conversion, and each tensor is dequantized to the serving dtype as
it is loaded, under its Hugging Face name, so the model classes load it like any other
checkpoint. With ``keep_q8`` (``--quantization q8_0``) a Q8_0 matrix instead comes as its
own blocks (``xllm_ops.q8.Q8Tensor``), not a value changed.

NOTE: llama.cpp's converter permutes the rows of a Llama model's Q and K projections
(its RoPE pairs neighbouring dimensions, Hugging Face's pairs the two halves); loading
undoes that, so the weights match the Hugging Face layout the rotary layer expects.
Q8_0 blocks run along a row, so reordering whole rows of a file's bytes keeps them intact.
Qwen2/Qwen3 files are written unpermuted.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from xllm_ops.q8 import Q8Tensor, from_blocks

# GGUF general.architecture -> (Hugging Face architecture, model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
PERMUTED_QK = {"llama"}  # architectures whose Q/K rows llama.cpp reorders

_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file xllm cannot serve (its architecture, a quant type, a missing key)."""


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _architecture(reader, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path.name}: architecture {arch!r} is not supported for GGUF; "
                        f"supported: {', '.join(ARCHITECTURES)}")
    return arch


def read_config(path: Path) -> dict:
    """The file's metadata as the ``config.json`` of the same model."""
    r = _reader(path)
    arch = _architecture(r, path)

    def need(key: str):
        value = _field(r, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path.name}: metadata key {arch}.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    names = {t.name for t in r.tensors}
    vocab = _field(r, f"{arch}.vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data)
    scaling = _field(r, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise GGUFError(f"{path.name}: RoPE scaling {scaling!r} is not supported for GGUF yet")
    hf_arch, model_type = ARCHITECTURES[arch]
    all_f32 = all(t.tensor_type.name == "F32" for t in r.tensors)
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(r, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(r, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(need("context_length")),
        "rope_theta": float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names and model_type != "qwen2",
        # "auto" serves quantized or half files in bf16 (the fast dtype on CPU), f32 ones in f32
        "dtype": "float32" if all_f32 else "bfloat16",
        "gguf_file": path.name,
    }
    bos, eos = _field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.eos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos is not None:
        config["eos_token_id"] = int(eos)
    return config


def tokenizer_cache_dir() -> Path:
    """Where converted GGUF tokenizers are kept: ``$XLLM_TOKENIZER_CACHE``, else
    ``~/.cache/xllm/gguf-tokenizers``."""
    return Path(os.environ.get("XLLM_TOKENIZER_CACHE") or Path.home() / ".cache" / "xllm" / "gguf-tokenizers")


def load_tokenizer(path: Path):
    """The tokenizer and chat template stored in the file, as a transformers fast tokenizer.

    transformers builds it from the file's vocabulary and merges, which takes seconds for
    a 50k vocabulary; the result is saved once per file (keyed by its path, size and
    mtime) and later loads read the saved one.
    """
    from transformers import AutoTokenizer

    st = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
    saved = tokenizer_cache_dir() / key
    if (saved / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=saved.parent))
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, saved)  # fails harmlessly if another process saved it first
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if name in _TOP:
        return _TOP[name]
    m = _BLOCK_NAME.match(name)
    if m is None or m.group(2) not in _BLOCK:
        raise GGUFError(f"GGUF tensor {name!r} has no counterpart in the supported models")
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK[part]}.{kind}"


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: within each head, rows (0, 2, 4, ..., 1, 3, ...)
    of its layout go back to Hugging Face's (first half, second half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor, path: Path) -> np.ndarray:
    """One tensor as float32 in its row-major shape (rows, columns)."""
    from gguf.quants import dequantize

    kind = tensor.tensor_type
    try:
        out = dequantize(tensor.data, kind)
    except NotImplementedError:
        raise GGUFError(f"{path.name}: tensor {tensor.name} is stored as {kind.name}, "
                        "a quant type xllm cannot dequantize") from None
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest axis first
    out = np.asarray(out, dtype=np.float32).reshape(shape)
    return out if out.flags.writeable else out.copy()  # F32 tensors come straight from the mmap


def iter_weights(path: Path, dtype: torch.dtype,
                 keep_q8: bool = False) -> Iterator[tuple[str, torch.Tensor | Q8Tensor]]:
    """(Hugging Face name, tensor in ``dtype``) for every tensor of the file; with ``keep_q8``
    each Q8_0 matrix as its blocks (``Q8Tensor``) instead."""
    import gguf

    r = _reader(path)
    arch = _architecture(r, path)
    heads = int(_field(r, f"{arch}.attention.head_count"))
    kv_heads = int(_field(r, f"{arch}.attention.head_count_kv", heads))
    for tensor in r.tensors:
        name = hf_name(tensor.name)
        blocks = keep_q8 and tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0 and len(tensor.shape) == 2
        w = tensor.data if blocks else dequantized(tensor, path)  # blocks: (rows, K / 32 * 34) bytes
        if arch in PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute(w, heads)
        elif arch in PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute(w, kv_heads)
        yield name, from_blocks(w) if blocks else torch.from_numpy(w).to(dtype)
