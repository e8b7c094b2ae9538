"""Write a Hugging Face checkpoint made here as a GGUF file (for tests of the GGUF loader).

The layout follows llama.cpp's converter: metadata under ``<arch>.*``, the byte-level BPE
tokenizer as ``tokenizer.ggml.*`` (tokens, merges, token types, special ids, chat
template), tensors under GGUF names, Llama's Q/K rows reordered for its RoPE, matrices
quantized (``Q8_0`` by default; ``Q4_0``, ``BF16``, ``F32``), norms and biases in F32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    _, _, layer, rest = name.split(".", 3)  # model.layers.N.<part>.<weight|bias>
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_NAMES[part]}.{kind}"


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama's Q/K: per head, the two halves interleaved."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer(writer, model_dir: Path) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id)):
        token = cfg.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            add(vocab[token])
    if cfg.get("chat_template"):
        writer.add_chat_template(cfg["chat_template"])


def export_gguf(model_dir: str | Path, out_file: str | Path, quant: str = "Q8_0") -> Path:
    """Write ``model_dir`` (a Llama, Qwen2 or Qwen3 checkpoint) to ``out_file``."""
    import gguf

    model_dir, out_file = Path(model_dir), Path(out_file)
    hf = json.loads((model_dir / "config.json").read_text())
    arch = hf["model_type"]
    heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    w = gguf.GGUFWriter(str(out_file), arch)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(hf.get("head_dim") or hf["hidden_size"] // heads)
    w.add_value_length(hf.get("head_dim") or hf["hidden_size"] // heads)
    w.add_rope_freq_base(float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_vocab_size(hf["vocab_size"])
    qtype = gguf.GGMLQuantizationType[quant]
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{quant}"] if quant != "F32" else gguf.LlamaFileType.ALL_F32)
    _tokenizer(w, model_dir)
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    for name, t in tensors.items():
        t = t.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = permute(t, kv_heads)
        kind = qtype if t.ndim == 2 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(t, kind) if kind != gguf.GGMLQuantizationType.F32 else t
        w.add_tensor(gguf_name(name), data, raw_shape=t.shape if kind == gguf.GGMLQuantizationType.F32 else None,
                     raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file
