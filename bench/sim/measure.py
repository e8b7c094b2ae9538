"""Measure one instance's profile in this process, the way a worker does at start, and
write it as JSON for the simulator (``--profile``).

    python -m bench.sim.measure [--model preset:llama-110m] [--threads 1] [--out PATH]

The worker's own ``Profiler`` on a ``ModelRunner`` (float32, eager steps, the limits given):
what an instance started with the same flags publishes in its registration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import msgspec
import torch

HERE = Path(__file__).parent / "profiles"


def measure(model_dir: Path, threads: int, max_seqs: int, budget_tokens: int, num_blocks: int, max_len: int,
            budget_s: float):
    from xllm.config import CacheConfig, ModelConfig, SchedulerConfig, read_hf_config
    from xllm.worker.model_runner import ModelRunner
    from xllm.worker.profiler import Profiler

    torch.set_num_threads(threads)
    model = ModelConfig(str(model_dir), dtype="float32", max_model_len=max_len, enforce_eager=True)
    cache = CacheConfig(block_size=16, num_blocks=num_blocks)
    sched = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget_tokens)
    runner = ModelRunner(model, cache, read_hf_config(model_dir))
    return Profiler(runner, sched, cache, max_len, budget_s=budget_s).measure()


def main(argv: list[str] | None = None) -> int:
    from bench.common import resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="preset:llama-110m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=12.0)
    p.add_argument("--out", default=str(HERE / "llama-110m-fp32-1thread.json"))
    args = p.parse_args(argv)
    prof = measure(resolve_model(args.model), args.threads, args.max_num_seqs, args.max_num_batched_tokens,
                   args.num_kv_blocks, args.max_model_len, args.budget_s)
    Path(args.out).write_bytes(msgspec.json.format(msgspec.json.encode(prof)) + b"\n")
    print(f"{args.out}: {prof}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
