"""The model runner: turns a ``StepPlan`` into one forward pass and sampled tokens.

It keeps, per request, the token ids and KV block ids the scheduler sent (plus the
tokens it sampled itself, which fill the scheduler's placeholders), builds the step's
flattened inputs with array operations, runs the model and samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

import xllm_ops

from ..config import CacheConfig, ModelConfig, SpeculativeConfig
from ..layers.parallel import SINGLE, TPGroup
from ..models.loader import iter_weights
from ..models.registry import model_class
from ..models.spec import DecoderSpec
from ..protocol import SamplingParams, StepPlan, StepResult
from ..spec import make_proposer
from .grammar import GrammarRows
from .graph_runner import DecodeGraphs
from .kv_cache import LoadWait, allocate_kv_cache
from .logits_processors import apply_processors
from .sampler import Sampler, SamplingBatch, seed_for_token, token_logprobs
from .speculative import Speculator
from .step_inputs import StepInputs, step_inputs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# a speculative step whose requests compute at most this many tokens each runs as decode rows
VERIFY_AS_DECODES = 16


@dataclass
class RequestState:
    """What a worker remembers of one request between steps."""

    token_ids: list[int]  # prompt, outputs the scheduler sent, tokens sampled here
    block_ids: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None  # per-request generator when a seed is given
    num_prompt_tokens: int
    eos_token_ids: list[int]
    has_processors: bool  # bias, penalties or min_tokens apply
    done: bool = False  # its last sampled token ended it (the scheduler will drop it)


class ModelRunner:
    """Owns the model weights, the KV cache and the per-request state of one rank."""

    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, hf_config: dict,
                 tp: TPGroup = SINGLE, micro_batch_overlap: bool = False,
                 graph_buckets: list[int] | None = None, shared_kv: str = "",
                 speculative: SpeculativeConfig | None = None) -> None:
        self.spec = DecoderSpec.from_hf(hf_config)
        self.dtype = DTYPES[model_cfg.dtype]
        self.block_size = cache_cfg.block_size
        self.tp = tp
        self.micro_batch_overlap = micro_batch_overlap and tp.size > 1
        t0 = time.perf_counter()
        quantized = model_cfg.quantization != "none"
        self.model = model_class(self.spec.architecture)(self.spec, tp, self.dtype, model_cfg.quantization)
        # NOTE: quantized linears are quantized from the checkpoint's own values (read as float32),
        # and a GGUF file's Q8_0 blocks are kept as they are; the layers convert the rest to dtype
        self.model.load_weights(iter_weights(model_cfg.path, torch.float32 if quantized else self.dtype,
                                             keep_q8=quantized))
        self.model.eval()
        self.model.prepare_for_serving()
        xllm_ops.warm_up()
        log.info("loaded %s in %.1f s", self.spec.architecture, time.perf_counter() - t0)
        # NOTE: one block more than the scheduler hands out: padding rows of graphs use it
        # With ``shared_kv`` the pool is a shared file the KV agent maps, and each step's
        # layer progress is published in it (``xllm.kv_transfer.pool``).
        self.kv_pool = allocate_kv_cache(self.model.attention_layers(), cache_cfg.num_blocks + 1,
                                         self.block_size, self.dtype, shared_kv)
        self.sampler = Sampler(model_cfg.seed)
        # NOTE: only rank 0 constrains its samples; the other ranks take its tokens
        self.grammars = GrammarRows(lambda: _grammar_compiler(model_cfg.path, self.spec.vocab_size),
                                    enabled=tp.rank == 0)
        self.requests: dict[str, RequestState] = {}
        # the final hidden states of every position a forward computes, for an MTP proposer
        self._load_wait: LoadWait | None = None  # set by execute for its first forward
        self.hidden_sink: Callable[[list[str], list[int], list[int], torch.Tensor], None] | None = None
        spec = speculative or SpeculativeConfig()
        self.graphs: DecodeGraphs | None = None
        if graph_buckets:
            max_blocks = -(-model_cfg.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, graph_buckets, max_blocks, cache_cfg.num_blocks,
                                       self.block_size, keep_hidden=spec.method == "mtp")
        extra = {}
        if spec.method == "draft":
            extra = {"target": self, "model": replace(model_cfg, path=spec.draft_model, enforce_eager=False),
                     "cache": cache_cfg, "graph_buckets": graph_buckets}
        elif spec.method == "mtp":
            extra = {"target": self, "path": model_cfg.path, "cache": cache_cfg}
        self.proposer = make_proposer(spec.method, **extra)  # speculative decoding's drafts (None: off)
        self.speculator = Speculator(self.proposer) if self.proposer is not None else None

    # -- state ------------------------------------------------------------------------------
    def _apply_plan_state(self, plan: StepPlan) -> None:
        for rid in plan.finished_req_ids:
            self.requests.pop(rid, None)
            self.grammars.drop(rid)
            if self.speculator is not None:
                self.speculator.drop(rid)
                self.proposer.drop(rid)
        for new in plan.new_requests:
            seed = new.sampling.seed
            gen = torch.Generator() if seed is not None else None  # seeded per token: seed_for_token
            sp = new.sampling
            has_proc = bool(sp.logit_bias or sp.presence_penalty or sp.frequency_penalty
                            or sp.repetition_penalty != 1.0 or sp.min_tokens)
            self.requests[new.req_id] = RequestState(list(new.token_ids), list(new.block_ids), sp, gen,
                                                     new.num_prompt_tokens, list(new.eos_token_ids),
                                                     has_proc)
            self.grammars.add(new.req_id, sp.structured, new.token_ids[new.num_prompt_tokens:],
                              [*new.eos_token_ids, *sp.stop_token_ids])
            if self.proposer is not None:
                self.proposer.drop(new.req_id)  # a recomputed request starts its index again
                self.proposer.add(new.req_id, list(new.token_ids), new.num_prompt_tokens)
        for rid, blocks in plan.new_block_ids.items():
            self.requests[rid].block_ids.extend(blocks)

    # -- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step: forward, sample, remember the sampled tokens. A request whose range
        goes past its known tokens decodes on, one forward per token (multi-step decode)."""
        t0 = time.perf_counter()
        result = StepResult(plan.step_id, [], [], 0.0)
        load_wait = LoadWait(self.kv_pool, plan.step_id) if plan.loads_kv and self.kv_pool is not None else None
        self._load_wait = load_wait  # the step's first forward (forward_ranges) waits for the loads
        ranges = self._begin(plan)
        logprobs = _LogprobRows(max((self.requests[r].sampling.logprobs or 0 for r, _, _ in ranges
                                     if self.requests[r].sampling.logprobs is not None), default=-1))
        if self.speculator is not None and any(end > len(self.requests[rid].token_ids) for rid, _, end in ranges):
            # positions past the known tokens are drafts to verify; a step with no room for
            # drafts (more decoding requests than --speculative-max-batch) runs as without speculation
            result.req_ids, result.token_ids, counts = self.speculator.execute(self, plan.step_id, ranges, logprobs)
            result.spec_counts = {rid: (n, counts.accepted[rid]) for rid, n in counts.proposed.items()}
            return self._finish(result, logprobs, load_wait, t0)
        req_ids, logits = self.forward_ranges(plan.step_id, ranges)
        ends = {rid: end for rid, _, end in ranges}
        while req_ids:
            tokens = self._sample(req_ids, logits, logprobs)
            result.req_ids.extend(req_ids)
            result.token_ids.extend(tokens)
            # NOTE: position p samples token p + 1, so a range ending at e is done at e + 1 tokens
            more = [r for r in req_ids if not self.requests[r].done and len(self.requests[r].token_ids) <= ends[r]]
            if not more:
                break
            req_ids, logits = self._step_logits(more, [1] * len(more),
                                                [len(self.requests[r].token_ids) - 1 for r in more], progress=False)
        return self._finish(result, logprobs, load_wait, t0)

    @staticmethod
    def _finish(result: StepResult, logprobs: "_LogprobRows", load_wait: LoadWait | None, t0: float) -> StepResult:
        logprobs.fill(result)
        result.kv_load_wait_s = load_wait.waited if load_wait is not None else 0.0
        result.forward_s = time.perf_counter() - t0
        return result

    def _sample(self, req_ids: list[str], logits: torch.Tensor, logprobs: "_LogprobRows") -> list[int]:
        """Sample one token per row, append it to its request, mark the requests it ends."""
        states = [self.requests[r] for r in req_ids]
        want_lp = [i for i, s in enumerate(states) if s.sampling.logprobs is not None]
        raw = logits[want_lp].clone() if want_lp else None
        if any(s.has_processors for s in states):
            apply_processors(logits, states)
        self.grammars.mask(logits, req_ids)
        for s in states:
            if s.generator is not None:
                seed_for_token(s.generator, s.sampling.seed, len(s.token_ids) - s.num_prompt_tokens)
        batch = SamplingBatch.build([s.sampling for s in states], [s.generator for s in states],
                                    self.spec.vocab_size)
        sampled = self.sampler(logits, batch)
        self.tp.broadcast(sampled)  # every rank keeps rank 0's tokens, whatever its own floats said
        tokens = sampled.tolist()
        self.grammars.advance(req_ids, tokens)
        for rid, tok in zip(req_ids, tokens):
            self.commit(rid, [tok])
        if want_lp:
            logprobs.add([req_ids[i] for i in want_lp], raw, sampled[want_lp])
        return tokens

    def commit(self, req_id: str, tokens: list[int]) -> int:
        """Append sampled (or accepted) tokens to a request, up to the one that ends it (then
        it is done); returns how many were appended."""
        state = self.requests[req_id]
        n = 0
        for tok in tokens:
            state.token_ids.append(tok)
            n += 1
            n_out = len(state.token_ids) - state.num_prompt_tokens
            if state.sampling.finish_reason(tok, n_out, state.eos_token_ids) is not None:
                state.done = True
                break
        if self.proposer is not None:
            self.proposer.extend(req_id, tokens[:n])
        return n

    @torch.inference_mode()
    def step_logits(self, plan: StepPlan) -> tuple[list[str], torch.Tensor]:
        """Apply the plan's state changes and run the forward pass over each request's
        range up to the tokens it knows: the requests that sample and their (S, vocab)
        float32 logits. Requests this worker saw end are left out."""
        return self.forward_ranges(plan.step_id, self._begin(plan))

    def _begin(self, plan: StepPlan) -> list[tuple[str, int, int]]:
        """Apply the plan's state changes; each running request's (id, first position,
        end of its range) in the plan's order."""
        self._apply_plan_state(plan)
        ranges = []
        for rid, n, c in zip(plan.scheduled_req_ids, plan.num_scheduled, plan.num_computed):
            state = self.requests[rid]
            if state.done:
                continue  # it ended in an earlier step; the scheduler drops it when it hears
            shift = c - (len(state.token_ids) - 1)
            if shift > 0:
                # NOTE: an earlier step gave it fewer tokens than the scheduler planned (rejected
                # speculative tokens) when this step was planned: the range starts at its last
                # token instead; the scheduler allocated KV for the planned, later range
                c -= shift
            ranges.append((rid, c, c + n))
        return ranges

    def forward_ranges(self, step_id: int, ranges: list[tuple[str, int, int]],
                       rows: list[int] | None = None) -> tuple[list[str], torch.Tensor]:
        """The forward pass of each range up to its request's known tokens; the logits of
        the last ``rows[i]`` (default 1) positions of each request that samples."""
        ids = [rid for rid, _, _ in ranges]
        n_comp = [c for _, c, _ in ranges]
        n_sched = [min(e, len(self.requests[rid].token_ids)) - c for rid, c, e in ranges]
        pool = self.kv_pool
        if pool is None:
            return self._step_logits(ids, n_sched, n_comp, rows=rows)
        load_wait, self._load_wait = self._load_wait, None
        pool.start_step(step_id)
        try:
            out = self._step_logits(ids, n_sched, n_comp, rows=rows, load_wait=load_wait)
            if load_wait is not None:
                load_wait.finish()
            return out
        finally:
            pool.layer_done(pool.num_layers)

    def _step_logits(self, ids: list[str], n_sched: list[int], n_comp: list[int], progress: bool = True,
                     rows: list[int] | None = None,
                     load_wait: LoadWait | None = None) -> tuple[list[str], torch.Tensor]:
        """The forward pass; logits of the last ``rows[i]`` (default 1) positions of each request
        whose range reaches its known end, and each such row's request id. With ``load_wait``
        (the step loads KV back from the host tier) attention waits for each layer's."""
        if not ids:
            return [], torch.empty(0)
        if self.micro_batch_overlap and len(ids) > 1 and rows is None:
            return self._micro_batch_logits(ids, n_sched, n_comp, load_wait)  # progress only at the end
        # a verification step (every range short) runs as decode rows through the graphs:
        # eagerly, a step of a 30-layer model costs more in Python than in arithmetic
        as_decodes = (rows is not None and self.graphs is not None and load_wait is None
                      and max(n_sched) <= VERIFY_AS_DECODES and self.graphs.bucket_for(sum(n_sched)) is not None)
        inp = self._prepare(ids, n_sched, n_comp, rows, as_decodes)
        if self.kv_pool is not None and progress:
            layer_done = self.kv_pool.layer_done
            inp.meta.on_layer_stored = lambda index: layer_done(index + 1)
        inp.meta.wait_for_layer = load_wait
        n_rows = len(inp.input_ids)
        if (self.graphs is not None and inp.meta.all_decode and load_wait is None
                and self.graphs.bucket_for(n_rows)):
            m = inp.meta
            logits = self.graphs.run(inp.input_ids, inp.positions, m.slot_mapping,
                                     m.decode_block_tables, m.decode_seq_lens)
            if self.hidden_sink is not None:
                logits, hidden = logits
                self.hidden_sink(ids, n_comp, n_sched, hidden)
            if len(inp.sample_req_ids) == n_rows:  # every row samples: rows are 0..n-1, no copy
                return inp.sample_req_ids, logits
            return inp.sample_req_ids, logits[inp.sample_rows]
        hidden = self.model(inp.input_ids, inp.positions, inp.meta)
        if self.hidden_sink is not None:
            self.hidden_sink(ids, n_comp, n_sched, hidden)
        return inp.sample_req_ids, self.model.compute_logits(hidden[inp.sample_rows])

    def _micro_batch_logits(self, ids, n_sched, n_comp, load_wait=None) -> tuple[list[str], torch.Tensor]:
        """Two micro-batches of about equal token counts, run overlapped."""
        half = int(np.searchsorted(np.cumsum(n_sched), sum(n_sched) / 2)) + 1
        half = min(max(half, 1), len(ids) - 1)
        parts = [self._prepare(ids[:half], n_sched[:half], n_comp[:half]),
                 self._prepare(ids[half:], n_sched[half:], n_comp[half:])]
        for part in parts:
            part.meta.wait_for_layer = load_wait
        hiddens = self.model.forward_micro_batches(
            [(p.input_ids, p.positions, p.meta) for p in parts], self.tp)
        logits = [self.model.compute_logits(h[p.sample_rows]) for h, p in zip(hiddens, parts)]
        return parts[0].sample_req_ids + parts[1].sample_req_ids, torch.cat(logits)

    def _prepare(self, ids: list[str], num_scheduled: list[int], num_computed: list[int],
                 rows: list[int] | None = None, as_decodes: bool = False) -> StepInputs:
        states = [self.requests[r] for r in ids]
        return step_inputs(ids, [s.token_ids for s in states], [s.block_ids for s in states], num_scheduled,
                           num_computed, self.block_size, rows, as_decodes)


class _LogprobRows:
    """The logprob rows of one step, gathered over its decode iterations."""

    def __init__(self, k: int) -> None:
        self.k = k  # the most top logprobs any request of the step asked for (-1: none asked)
        self.req_ids: list[str] = []
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, req_ids: list[str], raw: torch.Tensor, tokens: torch.Tensor) -> None:
        """Rows for ``tokens`` sampled from the unprocessed logits ``raw`` (R, vocab)."""
        self.req_ids.extend(req_ids)
        self.parts.append(token_logprobs(raw, tokens, self.k))

    def fill(self, result: StepResult) -> None:
        if self.parts:
            result.logprob_req_ids = self.req_ids
            result.logprobs, result.top_ids, result.top_logprobs = (np.concatenate(p) for p in zip(*self.parts))


def _grammar_compiler(model_path: str, vocab_size: int):
    """The structured-output compiler for the served model's tokenizer."""
    from ..models.loader import load_tokenizer
    from ..structured import GrammarCompiler

    return GrammarCompiler(load_tokenizer(model_path), vocab_size)
