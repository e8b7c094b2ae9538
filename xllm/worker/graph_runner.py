"""Graph execution for decode steps: one compiled graph per batch-size bucket.

A decode step's batch size is rounded up to a bucket (1, 2, 4, 8, ...). Each bucket's
forward pass (embedding to logits) is compiled once with ``torch.compile`` and runs
over static input buffers taken from one pool sized for the largest bucket, so every
bucket reads its inputs from the same memory. Padding rows are harmless: they
attend to, and write their KV into, a scratch block no request owns, and their logits
are dropped. Attention is one opaque op inside the graph (``xllm_cpu::decode_attention``, C++),
so a graph does not depend on the context length.

Compiled artifacts go to inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``,
``~/.cache/xllm/inductor`` by default), so a restart compiles faster.
Prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from ..layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


def default_buckets(max_batch: int, step: int = 16) -> list[int]:
    """Powers of two up to ``step``, then multiples of ``step``, then ``max_batch``: a
    batch pads to at most ``step - 1`` extra rows (powers of two alone pad 33 to 64)."""
    out, b = [], 1
    while b < min(step, max_batch):
        out.append(b)
        b *= 2
    out.extend(range(step, max_batch, step))
    return out + [max_batch]


def configure_compile_cache() -> None:
    """Settings for compiling decode graphs. (The launcher points ``TORCHINDUCTOR_CACHE_DIR``
    at ``~/.cache/xllm/inductor`` so compiled graphs survive restarts.)"""
    import torch._inductor.config as inductor

    # NOTE: no weight freezing: frozen graphs bypass inductor's on-disk graph cache (a
    # restart would rebuild every graph). Linears reach their packed weights through the
    # opaque xllm_cpu::packed_linear op instead (xllm_ops.linear).
    inductor.freezing = False
    torch._dynamo.config.cache_size_limit = 64


class DecodeGraphs:
    """Compiled decode forward passes per batch bucket over a pool of static buffers."""

    def __init__(self, model, buckets: list[int], max_blocks_per_seq: int, pad_block: int,
                 block_size: int, keep_hidden: bool = False) -> None:
        configure_compile_cache()
        self.model = model
        self.keep_hidden = keep_hidden  # also return the final hidden states (an MTP layer reads them)
        self.buckets = sorted(buckets)
        self.pad_slot = pad_block * block_size
        n = self.buckets[-1]
        # the pool: every bucket uses the leading rows of these buffers
        self.input_ids = torch.zeros(n, dtype=torch.int64)
        self.positions = torch.zeros(n, dtype=torch.int64)
        self.slots = torch.full((n,), self.pad_slot, dtype=torch.int64)
        self.block_tables = torch.full((n, max_blocks_per_seq), pad_block, dtype=torch.int64)
        self.seq_lens = torch.ones(n, dtype=torch.int64)
        self.pad_block = pad_block
        self._compiled = torch.compile(self._forward, dynamic=False, fullgraph=True)
        self.compile_seconds: dict[int, float] = {}
        self.step_seconds: dict[int, float] = {}  # a step's time per bucket (padding rows), measured at warm-up
        self.runs: dict[int, int] = {b: 0 for b in self.buckets}  # decode steps served per bucket

    def _forward(self, input_ids, positions, slots, block_tables, seq_lens) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=slots, decode_rows=None, decode_block_tables=block_tables,
                                 decode_seq_lens=seq_lens, all_decode=True)
        hidden = self.model(input_ids, positions, meta)
        logits = self.model.compute_logits(hidden)
        return (logits, hidden) if self.keep_hidden else logits

    def bucket_for(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    @torch.inference_mode()
    def warm_up(self, progress: bool = True) -> None:
        """Compile every bucket now (padding rows only: nothing real is touched)."""
        from tqdm import tqdm

        for b in tqdm(self.buckets, desc="compiling decode graphs", disable=not progress):
            t0 = time.perf_counter()
            self._run_bucket(b)
            self.compile_seconds[b] = time.perf_counter() - t0
        for b in self.buckets:  # what a step costs at each bucket (speculation weighs drafts with it)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                self._run_bucket(b)
                times.append(time.perf_counter() - t0)
            self.step_seconds[b] = min(times)
        log.info("decode graphs ready for batch sizes %s in %.1f s (a step: %s ms)", self.buckets,
                 sum(self.compile_seconds.values()),
                 ", ".join(f"{b}: {t * 1000:.1f}" for b, t in self.step_seconds.items()))

    def _run_bucket(self, b: int) -> torch.Tensor:
        return self._compiled(self.input_ids[:b], self.positions[:b], self.slots[:b],
                              self.block_tables[:b], self.seq_lens[:b])

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor):
        """Logits (n, vocab) for a decode batch of n <= the largest bucket (with
        ``keep_hidden``: and the final hidden states (n, hidden))."""
        n = input_ids.shape[0]
        b = self.bucket_for(n)
        width = block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.block_tables[:n, :width].copy_(block_tables)
        self.seq_lens[:n].copy_(seq_lens)
        # NOTE: the graphs differ only in batch size and nothing they depend on changes once
        # warmed up (weights, buffers, caches), so only the guards that tell the buckets
        # apart run: evaluating all of them costs about 0.6 ms a step here.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            out = self._run_bucket(b)
        out = (out[0][:n], out[1][:n]) if self.keep_hidden else out[:n]
        self.runs[b] += 1
        if self.runs[b] == 1:
            log.info("decode graph for batch size %d in use", b)
        # leave the rows clean for the next, smaller batch: padding again
        self.slots[:n].fill_(self.pad_slot)
        self.block_tables[:n].fill_(self.pad_block)
        self.seq_lens[:n].fill_(1)
        return out
