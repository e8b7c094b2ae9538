"""Device differences in one place: cpu (tested here), cuda and npu (untested here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    name: str
    dist_backend: str  # torch.distributed backend for collectives


def current() -> Platform:
    """The platform this process runs on."""
    import torch

    if torch.cuda.is_available():  # untested on this project's machines
        return Platform("cuda", "nccl")
    try:  # untested on this project's machines
        import torch_npu  # noqa: F401

        return Platform("npu", "hccl")
    except ImportError:
        return Platform("cpu", "gloo")
