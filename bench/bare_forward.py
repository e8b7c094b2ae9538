"""In-process timing of one decode step, without any engine around it (W5 part A).

Up to three figures per batch size, on a ``ModelRunner`` built here:

- eager forward: ``runner.model(input_ids, positions, meta)`` + ``compute_logits`` on a
  hand-built all-decode batch;
- graph forward: the compiled decode graph of that batch size (``runner.graphs.run``),
  what a worker runs for decode steps unless launched with ``--enforce-eager``;
- runner step: ``runner.execute(plan)`` on a hand-built ``StepPlan`` (the forward the
  worker would pick, plus building the inputs from the plan and sampling).

The KV cache holds whatever was written (random prompts are never prefilled): the
timing of a decode step does not depend on the values.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

import torch

from xllm.config import CacheConfig, ModelConfig, read_hf_config
from xllm.layers.attention import AttentionMetadata
from xllm.layers.parallel import SINGLE, TPGroup
from xllm.platform import serving_dtype
from xllm.protocol import NewRequestData, SamplingParams, StepPlan
from xllm.worker.model_runner import ModelRunner

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype ``xllm-launch --dtype auto`` picks for this checkpoint on this machine."""
    return serving_dtype(read_hf_config(model_dir))


class DecodeBench:
    """A runner holding ``batch`` requests of ``context`` tokens each, ready to decode."""

    def __init__(self, model_dir: Path, batch: int, context: int, iters: int, graphs: bool,
                 block_size: int = 16, tp: TPGroup = SINGLE, micro_batch_overlap: bool = False,
                 quantization: str = "none") -> None:
        self.batch, self.context, self.bs = batch, context, block_size
        blocks_per_req = -(-(context + iters + 8) // block_size)
        hf = read_hf_config(model_dir)
        if graphs:  # the launcher's cache of compiled graphs, so this compiles once
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "xllm" / "inductor"))
        self.runner = ModelRunner(ModelConfig(str(model_dir), checkpoint_dtype(model_dir), context + iters + 64,
                                              quantization=quantization),
                                  CacheConfig(block_size, batch * blocks_per_req + 1), hf, tp, micro_batch_overlap,
                                  graph_buckets=[batch] if graphs else None)
        if self.runner.graphs is not None:
            self.runner.graphs.warm_up(progress=False)
        rng = random.Random(batch)  # the same prompts on every TP rank
        vocab = self.runner.spec.vocab_size
        self.ids = [f"r{i}" for i in range(batch)]
        self.tables = [list(range(i * blocks_per_req, (i + 1) * blocks_per_req)) for i in range(batch)]
        new = [NewRequestData(rid, [rng.randrange(vocab) for _ in range(context + 1)], blocks, GREEDY, context + 1)
               for rid, blocks in zip(self.ids, self.tables)]
        self.step = 0
        self.runner.execute(StepPlan(0, new, {}, self.ids, [1] * batch, [context] * batch, []))

    def runner_step(self) -> float:
        """Seconds of one ``execute`` of the next decode step of every request."""
        self.step += 1
        plan = StepPlan(self.step, [], {}, self.ids, [1] * self.batch, [self.context + self.step] * self.batch, [])
        t0 = time.perf_counter()
        self.runner.execute(plan)
        return time.perf_counter() - t0

    def _inputs(self) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        b, pos = self.batch, self.context
        table = torch.tensor(self.tables, dtype=torch.int64)[:, : pos // self.bs + 1]  # (B, M)
        slots = table[:, pos // self.bs] * self.bs + pos % self.bs  # (B,)
        meta = AttentionMetadata(slot_mapping=slots, decode_rows=torch.arange(b), decode_block_tables=table,
                                 decode_seq_lens=torch.full((b,), pos + 1, dtype=torch.int64),
                                 max_decode_len=pos + 1, all_decode=True)
        return torch.randint(0, self.runner.spec.vocab_size, (b,)), torch.full((b,), pos, dtype=torch.int64), meta

    @torch.inference_mode()
    def eager_forward(self) -> float:
        """Seconds of the eager model forward and logits of one all-decode batch at ``context``."""
        input_ids, positions, meta = self._inputs()
        model = self.runner.model
        t0 = time.perf_counter()
        model.compute_logits(model(input_ids, positions, meta))
        return time.perf_counter() - t0

    @torch.inference_mode()
    def graph_forward(self) -> float:
        """Seconds of the compiled decode graph on the same batch (NaN without graphs)."""
        if self.runner.graphs is None:
            return float("nan")
        input_ids, positions, meta = self._inputs()
        t0 = time.perf_counter()
        self.runner.graphs.run(input_ids, positions, meta.slot_mapping, meta.decode_block_tables,
                               meta.decode_seq_lens)
        return time.perf_counter() - t0


    def measure(self, iters: int = 20, warmup: int = 3) -> dict:
        """Median seconds of the eager forward, the graph forward and the runner step.

        The three are interleaved so drift on a noisy machine hits them alike.
        """
        eager, graph, step = [], [], []
        for i in range(iters + warmup):
            e, g, s = self.eager_forward(), self.graph_forward(), self.runner_step()
            if i >= warmup:
                eager.append(e)
                graph.append(g)
                step.append(s)
        med = statistics.median
        return {"eager": med(eager), "graph": med(graph), "runner": med(step)}


def time_decode(model_dir: Path, batch: int, context: int, graphs: bool = True, iters: int = 20,
                warmup: int = 3, quantization: str = "none") -> dict:
    """``DecodeBench.measure`` on a fresh runner of ``batch`` requests at ``context``."""
    return DecodeBench(model_dir, batch, context, iters + warmup, graphs,
                       quantization=quantization).measure(iters, warmup)


def main() -> None:
    import argparse

    from xllm_tools.cache import ensure_model

    ap = argparse.ArgumentParser(description="median ms of one decode step in process: eager forward, "
                                 "compiled graph forward, runner step (prints only)")
    ap.add_argument("--model", default="preset:llama-110m-mha", help="model directory or preset:NAME")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--quantization", default="none", choices=["none", "q8_0"], help="as xllm-launch's")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = args.model
    model_dir = ensure_model(model.removeprefix("preset:")) if model.startswith("preset:") else Path(model)
    result = time_decode(model_dir, args.batch, args.context, iters=args.iters, warmup=5,
                         quantization=args.quantization)
    print(" ".join(f"{k} {v * 1e3:.2f} ms" for k, v in result.items()))


if __name__ == "__main__":
    main()
