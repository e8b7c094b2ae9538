"""The model runner: turns a ``StepPlan`` into one forward pass and sampled tokens.

It keeps, per request, the token ids and KV block ids the scheduler sent (plus the
tokens it sampled itself, which fill the scheduler's placeholders), builds the step's
flattened inputs with array operations, runs the model and samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

import xllm_ops

from ..config import CacheConfig, ModelConfig
from ..layers.attention import AttentionMetadata, PrefillSpan
from ..layers.parallel import SINGLE, TPGroup
from ..models.loader import iter_weights
from ..models.registry import model_class
from ..models.spec import DecoderSpec
from ..protocol import SamplingParams, StepPlan, StepResult
from .grammar import GrammarRows
from .graph_runner import DecodeGraphs
from .kv_cache import allocate_kv_cache
from .logits_processors import apply_processors
from .sampler import Sampler, SamplingBatch, seed_for_token, token_logprobs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


@dataclass
class StepInputs:
    """The flattened tensors of one step."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) rows whose logits are sampled
    sample_req_ids: list[str]  # (S,) their requests


class ModelRunner:
    """Owns the model weights, the KV cache and the per-request state of one rank."""

    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, hf_config: dict,
                 tp: TPGroup = SINGLE, micro_batch_overlap: bool = False,
                 graph_buckets: list[int] | None = None, shared_kv: str = "") -> None:
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
        self.graphs: DecodeGraphs | None = None
        if graph_buckets:
            max_blocks = -(-model_cfg.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, graph_buckets, max_blocks, cache_cfg.num_blocks,
                                       self.block_size)

    # -- state ------------------------------------------------------------------------------
    def _apply_plan_state(self, plan: StepPlan) -> None:
        for rid in plan.finished_req_ids:
            self.requests.pop(rid, None)
            self.grammars.drop(rid)
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
        for rid, blocks in plan.new_block_ids.items():
            self.requests[rid].block_ids.extend(blocks)

    # -- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step: forward, sample, remember the sampled tokens."""
        t0 = time.perf_counter()
        req_ids, logits = self.step_logits(plan)
        if not req_ids:
            return StepResult(plan.step_id, [], [], 0.0)
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
        for state, tok in zip(states, tokens):
            state.token_ids.append(tok)
        result = StepResult(plan.step_id, req_ids, tokens, 0.0)
        if want_lp:
            k = max(states[i].sampling.logprobs for i in want_lp)
            lp, top_ids, top_lp = token_logprobs(raw, sampled[want_lp], k)
            result.logprob_req_ids = [req_ids[i] for i in want_lp]
            result.logprobs, result.top_ids, result.top_logprobs = lp, top_ids, top_lp
        result.forward_s = time.perf_counter() - t0
        return result

    @torch.inference_mode()
    def step_logits(self, plan: StepPlan) -> tuple[list[str], torch.Tensor]:
        """Apply the plan's state changes and run the forward pass: the requests that sample
        this step and their (S, vocab) float32 logits."""
        self._apply_plan_state(plan)
        pool = self.kv_pool
        if pool is None:
            return self._step_logits(plan)
        pool.start_step(plan.step_id)
        try:
            return self._step_logits(plan)
        finally:
            pool.layer_done(pool.num_layers)

    def _step_logits(self, plan: StepPlan) -> tuple[list[str], torch.Tensor]:
        ids, n_sched, n_comp = plan.scheduled_req_ids, plan.num_scheduled, plan.num_computed
        if not ids:
            return [], torch.empty(0)
        if self.micro_batch_overlap and len(ids) > 1:
            return self._micro_batch_logits(ids, n_sched, n_comp)  # progress only at the end
        inp = self._prepare(ids, n_sched, n_comp)
        if self.kv_pool is not None:
            layer_done = self.kv_pool.layer_done
            inp.meta.on_layer_stored = lambda index: layer_done(index + 1)
        if self.graphs is not None and inp.meta.all_decode and self.graphs.bucket_for(len(ids)):
            m = inp.meta
            logits = self.graphs.run(inp.input_ids, inp.positions, m.slot_mapping,
                                     m.decode_block_tables, m.decode_seq_lens)
            if len(inp.sample_req_ids) == len(ids):  # every row samples: rows are 0..n-1, no copy
                return inp.sample_req_ids, logits
            return inp.sample_req_ids, logits[inp.sample_rows]
        hidden = self.model(inp.input_ids, inp.positions, inp.meta)
        return inp.sample_req_ids, self.model.compute_logits(hidden[inp.sample_rows])

    def _micro_batch_logits(self, ids, n_sched, n_comp) -> tuple[list[str], torch.Tensor]:
        """Two micro-batches of about equal token counts, run overlapped."""
        half = int(np.searchsorted(np.cumsum(n_sched), sum(n_sched) / 2)) + 1
        half = min(max(half, 1), len(ids) - 1)
        parts = [self._prepare(ids[:half], n_sched[:half], n_comp[:half]),
                 self._prepare(ids[half:], n_sched[half:], n_comp[half:])]
        hiddens = self.model.forward_micro_batches(
            [(p.input_ids, p.positions, p.meta) for p in parts], self.tp)
        logits = [self.model.compute_logits(h[p.sample_rows]) for h, p in zip(hiddens, parts)]
        return parts[0].sample_req_ids + parts[1].sample_req_ids, torch.cat(logits)

    def _prepare(self, ids: list[str], num_scheduled: list[int], num_computed: list[int]) -> "StepInputs":
        n_sched = np.asarray(num_scheduled, dtype=np.int64)
        n_comp = np.asarray(num_computed, dtype=np.int64)
        states = [self.requests[r] for r in ids]
        ends = n_comp + n_sched
        total = int(n_sched.sum())
        starts = np.cumsum(n_sched) - n_sched  # first row of each request
        # positions: n_comp[i] .. ends[i]-1 for each request, flattened
        positions = np.arange(total, dtype=np.int64) - np.repeat(starts - n_comp, n_sched)
        tokens: list[int] = []
        for s, c, e in zip(states, n_comp.tolist(), ends.tolist()):
            if e > len(s.token_ids):
                raise RuntimeError(f"plan asks for token {e - 1} of a request with {len(s.token_ids)}")
            tokens.extend(s.token_ids[c:e])
        max_blocks = max(len(s.block_ids) for s in states)
        table = np.zeros((len(states), max_blocks), dtype=np.int64)
        for i, s in enumerate(states):
            table[i, : len(s.block_ids)] = s.block_ids
        row_req = np.repeat(np.arange(len(states)), n_sched)
        slots = table[row_req, positions // self.block_size] * self.block_size + positions % self.block_size
        sample_mask = ends == np.asarray([len(s.token_ids) for s in states])
        return StepInputs(
            input_ids=torch.tensor(tokens, dtype=torch.int64),
            positions=torch.from_numpy(positions),
            meta=self._attention_metadata(n_sched, n_comp, starts, ends, table, slots),
            sample_rows=torch.from_numpy(starts[sample_mask] + n_sched[sample_mask] - 1),
            sample_req_ids=[ids[i] for i in np.nonzero(sample_mask)[0].tolist()],
        )

    def _attention_metadata(self, n_sched, n_comp, starts, ends, table, slots) -> AttentionMetadata:
        decode = n_sched == 1
        table_t = torch.from_numpy(table)
        meta = AttentionMetadata(slot_mapping=torch.from_numpy(slots), decode_rows=None,
                                 decode_block_tables=None, decode_seq_lens=None)
        if decode.any():
            idx = np.nonzero(decode)[0]
            seq_lens = ends[idx]
            blocks_needed = -(-int(seq_lens.max()) // self.block_size)
            meta.decode_rows = torch.from_numpy(starts[idx])
            meta.decode_block_tables = table_t[torch.from_numpy(idx), :blocks_needed]
            meta.decode_seq_lens = torch.from_numpy(seq_lens)
            meta.max_decode_len = int(seq_lens.max())
            meta.all_decode = bool(decode.all())
        for i in np.nonzero(~decode)[0].tolist():
            meta.prefills.append(PrefillSpan(int(starts[i]), int(n_sched[i]), int(n_comp[i]), table_t[i]))
        return meta


def _grammar_compiler(model_path: str, vocab_size: int):
    """The structured-output compiler for the served model's tokenizer."""
    from ..models.loader import load_tokenizer
    from ..structured import GrammarCompiler

    return GrammarCompiler(load_tokenizer(model_path), vocab_size)
