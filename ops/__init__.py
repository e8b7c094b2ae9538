"""xllm operator kernels: pure functions on tensors, each tested against ``reference``.

Installed as ``xllm_ops`` (PyPI already has an unrelated top-level ``ops``).
"""

from . import linear
from .paged_attention import (
    decode_attention,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_attention,
    write_kv,
)

__all__ = ["decode_attention", "linear", "paged_decode_attention", "paged_prefill_attention", "prefill_attention", "write_kv"]
