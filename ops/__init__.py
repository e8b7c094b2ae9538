"""xllm operator kernels: pure functions on tensors, each tested against ``reference``.

Installed as ``xllm_ops`` (PyPI already has an unrelated top-level ``ops``).
"""

from . import linear, paged_attention
from .paged_attention import (
    decode_attention,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_attention,
    write_kv,
)



def warm_up() -> None:
    """Build or load the compiled kernels now, so the first step does not wait for them."""
    from .native import kernels

    kernels()
    paged_attention._native_decode_op()


__all__ = ["warm_up", "decode_attention", "linear", "paged_decode_attention", "paged_prefill_attention", "prefill_attention", "write_kv"]
