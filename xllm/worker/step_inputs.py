"""A step's flattened model inputs from plain per-request data, with array operations.

Each request i computes the tokens at positions ``num_computed[i] ..
num_computed[i] + num_scheduled[i] - 1`` of its token list; the rows of all requests are
concatenated. A request whose range reaches the end of its token list samples: its last
``rows[i]`` positions (default 1) are the step's sample rows.

With ``as_decodes`` every row is a decode row of its own: it attends to its request's
cache up to and including its own position. A decode step stores every row's K/V before
any row attends, so the rows of one request see each other causally: a short range (a
speculative step's verification) then runs as a decode batch, through the compiled decode
graphs, with the decode kernel's per-row arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..layers.attention import AttentionMetadata, PrefillSpan


@dataclass
class StepInputs:
    """The flattened tensors of one step."""

    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # (S,) rows whose logits are sampled
    sample_req_ids: list[str]  # (S,) their requests


def step_inputs(ids: list[str], token_ids: Sequence[Sequence[int]], block_ids: Sequence[Sequence[int]],
                num_scheduled: list[int], num_computed: list[int], block_size: int,
                rows: list[int] | None = None, as_decodes: bool = False) -> StepInputs:
    """The inputs of one step over requests ``ids`` (their tokens and KV block tables)."""
    n_sched = np.asarray(num_scheduled, dtype=np.int64)
    n_comp = np.asarray(num_computed, dtype=np.int64)
    ends = n_comp + n_sched
    total = int(n_sched.sum())
    starts = np.cumsum(n_sched) - n_sched  # first row of each request
    # positions: n_comp[i] .. ends[i]-1 for each request, flattened
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts - n_comp, n_sched)
    tokens: list[int] = []
    for toks, c, e in zip(token_ids, n_comp.tolist(), ends.tolist()):
        tokens.extend(toks[c:e])
    table = np.zeros((len(ids), max(len(b) for b in block_ids)), dtype=np.int64)
    for i, b in enumerate(block_ids):
        table[i, : len(b)] = b
    row_req = np.repeat(np.arange(len(ids)), n_sched)
    slots = table[row_req, positions // block_size] * block_size + positions % block_size
    sel = np.nonzero(ends == np.asarray([len(t) for t in token_ids]))[0]  # they sample
    per = np.ones(len(sel), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)[sel]
    last = starts[sel] + n_sched[sel]  # one past each sampling request's last row
    sample_rows = np.repeat(last - per, per) + np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)
    return StepInputs(
        input_ids=torch.tensor(tokens, dtype=torch.int64),
        positions=torch.from_numpy(positions),
        meta=(decode_rows_metadata(row_req, positions, table, slots, block_size) if as_decodes
              else attention_metadata(n_sched, n_comp, starts, ends, table, slots, block_size)),
        sample_rows=torch.from_numpy(sample_rows),
        sample_req_ids=[ids[i] for i, k in zip(sel.tolist(), per.tolist()) for _ in range(k)],
    )


def decode_rows_metadata(row_req, positions, table, slots, block_size: int) -> AttentionMetadata:
    """Every row a decode: row r attends to its request's first ``positions[r] + 1`` slots."""
    seq_lens = positions + 1
    blocks_needed = -(-int(seq_lens.max()) // block_size)
    return AttentionMetadata(slot_mapping=torch.from_numpy(slots), decode_rows=torch.arange(len(positions)),
                             decode_block_tables=torch.from_numpy(table[row_req, :blocks_needed]),
                             decode_seq_lens=torch.from_numpy(seq_lens), max_decode_len=int(seq_lens.max()),
                             all_decode=True)


def attention_metadata(n_sched, n_comp, starts, ends, table, slots, block_size: int) -> AttentionMetadata:
    """Decode rows (one token) take the paged decode kernel; longer ranges are prefill spans."""
    decode = n_sched == 1
    table_t = torch.from_numpy(table)
    meta = AttentionMetadata(slot_mapping=torch.from_numpy(slots), decode_rows=None,
                             decode_block_tables=None, decode_seq_lens=None)
    if decode.any():
        idx = np.nonzero(decode)[0]
        seq_lens = ends[idx]
        blocks_needed = -(-int(seq_lens.max()) // block_size)
        meta.decode_rows = torch.from_numpy(starts[idx])
        meta.decode_block_tables = table_t[torch.from_numpy(idx), :blocks_needed]
        meta.decode_seq_lens = torch.from_numpy(seq_lens)
        meta.max_decode_len = int(seq_lens.max())
        meta.all_decode = bool(decode.all())
    for i in np.nonzero(~decode)[0].tolist():
        meta.prefills.append(PrefillSpan(int(starts[i]), int(n_sched[i]), int(n_comp[i]), table_t[i]))
    return meta
