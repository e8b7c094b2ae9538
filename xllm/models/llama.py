"""The Llama decoder (also the shape of Qwen2 and Qwen3, see their files).

Checkpoint names are the Hugging Face ones; q/k/v and gate/up are fused into single
matmuls at load time (``load_weights``).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..layers.activation import silu_and_mul
from ..layers.attention import Attention, AttentionMetadata
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..layers.parallel import SINGLE, TPGroup
from ..layers.rotary import RotaryEmbedding
from .spec import DecoderSpec


class LlamaAttention(nn.Module):
    def __init__(self, s: DecoderSpec, rotary: RotaryEmbedding, tp: TPGroup, dtype: torch.dtype,
                 quantization: str = "none") -> None:
        super().__init__()
        self.num_heads = s.num_heads // tp.size
        self.num_kv_heads = max(1, s.num_kv_heads // tp.size)
        self.head_dim = s.head_dim
        self.qkv_proj = QKVParallelLinear(s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads,
                                          s.qkv_bias, tp, dtype, quantization)
        self.o_proj = RowParallelLinear(s.num_heads * s.head_dim, s.hidden_size, s.o_bias, tp, dtype, quantization)
        self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps, dtype) if s.qk_norm else None
        self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps, dtype) if s.qk_norm else None
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, s.head_dim, s.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                partial: bool = False) -> torch.Tensor:
        """x: (T, hidden). With ``partial`` the output is this rank's unreduced share."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.out_sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # (T, h, d)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # (T, kvh, d)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta).reshape(t, -1)  # (T, h * d)
        return self.o_proj.partial(out) if partial else self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, s: DecoderSpec, tp: TPGroup, dtype: torch.dtype, quantization: str = "none") -> None:
        super().__init__()
        n = s.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(s.hidden_size, [n, n], s.mlp_bias, tp, dtype, quantization)
        self.down_proj = RowParallelLinear(n, s.hidden_size, s.mlp_bias, tp, dtype, quantization)

    def forward(self, x: torch.Tensor, partial: bool = False) -> torch.Tensor:
        h = silu_and_mul(self.gate_up_proj(x))
        return self.down_proj.partial(h) if partial else self.down_proj(h)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, s: DecoderSpec, rotary: RotaryEmbedding, tp: TPGroup, dtype: torch.dtype,
                 quantization: str = "none") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(s, rotary, tp, dtype, quantization)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(s, tp, dtype, quantization)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), meta)
        return x + self.mlp(self.post_attention_layernorm(x))


def mtp_layer(name: str, spec: DecoderSpec) -> int | None:
    """The index among the checkpoint's MTP layers of a tensor name (without ``model.``),
    or None: MTP layers are numbered on from the decoder's (``layers.{num_layers + i}``)."""
    if not spec.num_mtp_layers or not name.startswith("layers."):
        return None
    index = int(name.split(".", 2)[1]) - spec.num_layers
    return index if index >= 0 else None


class LlamaForCausalLM(nn.Module):
    """Token ids and positions of a flattened batch in; hidden states out.

    ``quantization`` is the linears' weight format (``xllm.layers.quantization``): "none"
    (``dtype``) or "q8_0". Embeddings, norms and biases are always ``dtype``.
    """

    # checkpoint name part -> (our module attribute, part index)
    fused = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: DecoderSpec, tp: TPGroup = SINGLE, dtype: torch.dtype = torch.float32,
                 quantization: str = "none") -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, dtype)
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position, spec.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, rotary, tp, dtype, quantization)
                                    for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tp, dtype, quantization)
        # NOTE: a quantized head keeps its own copy of a tied embedding, loaded from the same
        # checkpoint tensor (the embedding stays in dtype); a dense head shares the parameter
        self.head_from_embedding = spec.tie_word_embeddings and quantization != "none"
        if spec.tie_word_embeddings and not self.head_from_embedding:
            self.lm_head.weight = self.embed_tokens.weight

    def prepare_for_serving(self) -> None:
        """Prepare linear weights for serving: packed for the matrix engine, or the Q8_0
        kernel readied (after ``load_weights``)."""
        for module in self.modules():
            if hasattr(module, "pack"):
                module.pack()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden states (T, hidden)."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)

    def forward_micro_batches(self, batches: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
                              tp: TPGroup) -> list[torch.Tensor]:
        """Like ``forward`` for several micro-batches at once, each one's all-reduces running
        while the next computes (see ``xllm.models.microbatch``)."""
        from .microbatch import run_overlapped

        return run_overlapped(self, batches, tp)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32."""
        return self.lm_head.logits(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in; raises if one is unknown or one is missing."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue
            name = name.removeprefix("model.")
            if mtp_layer(name, self.spec) is not None:
                continue  # a multi-token-prediction layer: xllm.models.mtp loads it
            path, _, kind = name.rpartition(".")
            mod_path, _, leaf = path.rpartition(".")
            part = 0
            if leaf in self.fused:
                leaf, part = self.fused[leaf]
            target = f"{mod_path}.{leaf}" if mod_path else leaf
            module = modules.get(target)
            if module is None or not hasattr(module, "load"):
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            module.load(part, tensor, is_bias=kind == "bias")
            loaded.add(f"{target}.{kind}")
            if self.head_from_embedding and target == "embed_tokens":
                self.lm_head.load(0, tensor)
                loaded.add("lm_head.weight")
        expected = {n for n, _ in self.named_parameters()}
        if self.spec.tie_word_embeddings and not self.head_from_embedding:
            expected.discard("lm_head.weight")
        missing = expected - loaded
        if missing:
            raise KeyError(f"checkpoint is missing {sorted(missing)[:5]} ({len(missing)} tensors)")
