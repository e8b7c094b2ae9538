"""Device differences in one place: cpu (tested here), cuda and npu (untested here)."""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    name: str
    dist_backend: str  # torch.distributed backend for collectives
    native_bf16: bool  # bfloat16 matrix multiplies in hardware (else they are emulated, and slow)


@functools.cache
def current() -> Platform:
    """The platform this process runs on."""
    import torch

    if torch.cuda.is_available():  # untested on this project's machines
        return Platform("cuda", "nccl", True)
    try:  # untested on this project's machines
        import torch_npu  # noqa: F401

        return Platform("npu", "hccl", True)
    except ImportError:
        return Platform("cpu", "gloo", _cpu_bf16())


def _cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86: AVX-512 BF16 or AMX).

    NOTE: without it oneDNN and torch emulate bf16 matrix multiplies: measured on an
    AVX2-only EPYC, a 2048³ bf16 GEMM ran at 0.2 GFLOP/s against 37 for float32.
    """
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def serving_dtype(hf_config: dict) -> str:
    """The dtype ``--dtype auto`` serves a checkpoint in (its ``config.json`` given): a float32
    checkpoint in float32; 16-bit (and quantized) ones in bfloat16 where the device computes
    it natively, else in float32 (twice the memory, far faster than emulated bfloat16)."""
    if str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32") == "float32":
        return "float32"
    return "bfloat16" if current().native_bf16 else "float32"
