"""A checkpoint's multi-token-prediction (MTP) layer, DeepSeek-V3 style, on the decoders
of this package (Llama, Qwen2, Qwen3).

At position p it combines the main model's final hidden state h_p (after its last norm)
with the embedding of the next token t_{p+1} and predicts t_{p+2}::

    x = eh_proj(concat(enorm(embed(t_{p+1})), hnorm(h_p)))      # (T, hidden)
    y = decoder_layer(p, x)                                      # causal over MTP positions
    logits = lm_head(shared_head.norm(y))

The decoder layer has its own attention, hence its own KV cache (one layer). Chained
for more tokens, y stands in for h of the next position (as vLLM and SGLang chain one
MTP layer). The embedding and the output head are the main model's.

Checkpoint names: ``model.layers.{n}.enorm``, ``.hnorm``, ``.eh_proj``,
``.shared_head.norm`` and the decoder layer's own, with n = ``num_hidden_layers``
(``.embed_tokens`` and ``.shared_head.head``, which DeepSeek-V3 repeats there, are
skipped). NOTE: transformers loads such checkpoints but has no MTP forward (it skips the
layer), so this module is checked against a plain-torch rendering of the formula above
(tests/unit/test_mtp.py), not against transformers.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..layers.attention import Attention, AttentionMetadata
from ..layers.linear import ColumnParallelLinear
from ..layers.norm import RMSNorm
from ..layers.parallel import SINGLE
from ..layers.rotary import RotaryEmbedding
from .llama import LlamaDecoderLayer, mtp_layer
from .spec import DecoderSpec

_SKIPPED = ("embed_tokens.", "shared_head.head.")


class MultiTokenPredictor(nn.Module):
    """One MTP layer over a loaded main model (whose embedding and head it uses)."""

    fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, spec: DecoderSpec, main: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        h = spec.hidden_size
        self.spec = spec
        self.main = [main]  # a list: the main model is not a submodule (its weights are not ours)
        self.enorm = RMSNorm(h, spec.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(h, spec.rms_norm_eps, dtype)
        self.eh_proj = ColumnParallelLinear(2 * h, [h], False, dtype=dtype)
        rotary = RotaryEmbedding(spec.head_dim, spec.max_position, spec.rope)
        self.layer = LlamaDecoderLayer(spec, rotary, SINGLE, dtype)
        self.norm = RMSNorm(h, spec.rms_norm_eps, dtype)  # shared_head.norm

    def attention_layers(self) -> list[Attention]:
        return [self.layer.self_attn.attn]

    def prepare_for_serving(self) -> None:
        for module in self.modules():
            if hasattr(module, "pack"):
                module.pack()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, prev_hidden: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids (T,): t_{p+1}; positions (T,): p; prev_hidden (T, hidden): h_p -> (T, hidden)."""
        e = self.enorm(self.main[0].embed_tokens(input_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(prev_hidden)], dim=-1))
        return self.layer(positions, x, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32, through the main model's head."""
        return self.main[0].lm_head.logits(self.norm(hidden)).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take the first MTP layer's tensors from a whole checkpoint's; raises if one is missing."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if mtp_layer(name, self.spec) != 0:
                continue
            rest = name.split(".", 2)[2]  # after "layers.{n}."
            if rest.startswith(_SKIPPED):
                continue
            rest = rest.replace("shared_head.norm", "norm")
            if not rest.startswith(("enorm", "hnorm", "eh_proj", "norm")):
                rest = "layer." + rest
            path, _, kind = rest.rpartition(".")
            mod_path, _, leaf = path.rpartition(".")
            part = 0
            if leaf in self.fused:
                leaf, part = self.fused[leaf]
            target = f"{mod_path}.{leaf}" if mod_path else leaf
            module = modules.get(target)
            if module is None or not hasattr(module, "load"):
                raise KeyError(f"checkpoint tensor {name!r} has no place in the MTP layer")
            module.load(part, tensor, is_bias=kind == "bias")
            loaded.add(f"{target}.{kind}")
        missing = {n for n, _ in self.named_parameters()} - loaded
        if missing:
            raise KeyError(f"the checkpoint's MTP layer is missing {sorted(missing)[:5]}")
