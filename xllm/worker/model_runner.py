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
from .kv_cache import LoadWait, allocate_kv_cache
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
    done: bool = False  # its last sampled token ended it (the scheduler will drop it)


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
        self.model = model_class(self.spec.architecture)(self.spec, tp, self.dtype)
        self.model.load_weights(iter_weights(model_cfg.path, self.dtype))
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
        """Run one step: forward, sample, remember the sampled tokens. A request whose range
        goes past its known tokens decodes on, one forward per token (multi-step decode)."""
        t0 = time.perf_counter()
        result = StepResult(plan.step_id, [], [], 0.0)
        load_wait = LoadWait(self.kv_pool, plan.step_id) if plan.loads_kv and self.kv_pool is not None else None
        req_ids, logits = self.step_logits(plan, load_wait)
        result.kv_load_wait_s = load_wait.waited if load_wait is not None else 0.0
        logprobs = _LogprobRows(max((self.requests[r].sampling.logprobs or 0 for r in req_ids
                                     if self.requests[r].sampling.logprobs is not None), default=-1))
        ends = dict(zip(plan.scheduled_req_ids, map(sum, zip(plan.num_computed, plan.num_scheduled))))
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
        logprobs.fill(result)
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
        for state, tok in zip(states, tokens):
            state.token_ids.append(tok)
            n_out = len(state.token_ids) - state.num_prompt_tokens
            state.done = state.sampling.finish_reason(tok, n_out, state.eos_token_ids) is not None
        if want_lp:
            logprobs.add([req_ids[i] for i in want_lp], raw, sampled[want_lp])
        return tokens

    @torch.inference_mode()
    def step_logits(self, plan: StepPlan, load_wait: LoadWait | None = None) -> tuple[list[str], torch.Tensor]:
        """Apply the plan's state changes and run the forward pass over each request's
        range up to the tokens it knows: the requests that sample and their (S, vocab)
        float32 logits. Requests this worker saw end are left out. With ``load_wait``
        (the plan loads KV back from the host tier) attention waits for each layer's."""
        self._apply_plan_state(plan)
        ids, n_sched, n_comp = [], [], []
        for rid, n, c in zip(plan.scheduled_req_ids, plan.num_scheduled, plan.num_computed):
            state = self.requests[rid]
            if state.done:
                continue  # it ended in an earlier step; the scheduler drops it when it hears
            known = len(state.token_ids)
            if c >= known:
                raise RuntimeError(f"plan asks for token {c} of a request with {known}")
            ids.append(rid)
            n_sched.append(min(c + n, known) - c)
            n_comp.append(c)
        pool = self.kv_pool
        if pool is None:
            return self._step_logits(ids, n_sched, n_comp)
        pool.start_step(plan.step_id)
        try:
            out = self._step_logits(ids, n_sched, n_comp, load_wait=load_wait)
            if load_wait is not None:
                load_wait.finish()
            return out
        finally:
            pool.layer_done(pool.num_layers)

    def _step_logits(self, ids: list[str], n_sched: list[int], n_comp: list[int],
                     progress: bool = True, load_wait: LoadWait | None = None) -> tuple[list[str], torch.Tensor]:
        if not ids:
            return [], torch.empty(0)
        if self.micro_batch_overlap and len(ids) > 1:
            return self._micro_batch_logits(ids, n_sched, n_comp, load_wait)  # progress only at the end
        inp = self._prepare(ids, n_sched, n_comp)
        if self.kv_pool is not None and progress:
            layer_done = self.kv_pool.layer_done
            inp.meta.on_layer_stored = lambda index: layer_done(index + 1)
        inp.meta.wait_for_layer = load_wait
        if (self.graphs is not None and inp.meta.all_decode and load_wait is None
                and self.graphs.bucket_for(len(ids))):
            m = inp.meta
            logits = self.graphs.run(inp.input_ids, inp.positions, m.slot_mapping,
                                     m.decode_block_tables, m.decode_seq_lens)
            if len(inp.sample_req_ids) == len(ids):  # every row samples: rows are 0..n-1, no copy
                return inp.sample_req_ids, logits
            return inp.sample_req_ids, logits[inp.sample_rows]
        hidden = self.model(inp.input_ids, inp.positions, inp.meta)
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
