"""The worker's grammar collaborator (``xllm.worker.grammar``) and the shared compiler
(``xllm.structured``), with fabricated logits over the tiny-llama tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from xllm.models.loader import load_tokenizer
from xllm.protocol import InvalidParam, StructuredOutput
from xllm.structured import GrammarCompiler
from xllm.worker.grammar import GrammarRows, apply_bitmask

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["ok", "n"], "additionalProperties": False}
SO = StructuredOutput("json_schema", json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def tok(make_tiny):
    return load_tokenizer(make_tiny("tiny-llama"))


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, len(tok))


@pytest.fixture
def rows(compiler):
    return GrammarRows(lambda: compiler)


def eos(tok) -> int:
    return tok.eos_token_id


def generate(rows: GrammarRows, req_id: str, vocab: int, end: int, seed: int, limit: int = 200) -> list[int]:
    """Sample from random logits under the grammar until an end id: the output tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(limit):
        logits = torch.randn(1, vocab, generator=gen)
        rows.mask(logits, [req_id])
        tok = int(logits.argmax())
        out.append(tok)
        rows.advance([req_id], [tok])
        if tok == end:
            return out
    raise AssertionError("no end within the limit")


def test_apply_bitmask_keeps_exactly_the_set_bits():
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(3, 3, dtype=torch.int32)
    allowed = [[0, 31, 32], [69], [5, 63, 64]]
    words = bitmask.numpy().view("uint32")
    for r, ids in enumerate(allowed):
        for t in ids:
            words[r, t // 32] |= 1 << (t % 32)
    before = logits.clone()
    apply_bitmask(logits, bitmask)
    for r, ids in enumerate(allowed):
        finite = torch.isfinite(logits[r]).nonzero().flatten().tolist()
        assert finite == ids
        assert torch.equal(logits[r, ids], before[r, ids])


def test_mask_allows_only_what_the_grammar_allows_next(rows, tok):
    v = len(tok)
    rows.add("a", SO, [], [eos(tok)])
    logits = torch.zeros(1, v)
    rows.mask(logits, ["a"])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]).startswith("{") for t in allowed)


def test_sampled_output_matches_the_schema_and_ends_with_eos(rows, tok):
    jsonschema = pytest.importorskip("jsonschema")
    for seed in range(5):
        rows.add(f"r{seed}", SO, [], [eos(tok)])
        out = generate(rows, f"r{seed}", len(tok), eos(tok), seed)
        value = json.loads(tok.decode(out[:-1]))
        jsonschema.validate(value, SCHEMA)


def test_only_end_ids_follow_a_complete_grammar_even_under_min_tokens(rows, tok):
    stop = 7
    rows.add("a", StructuredOutput("regex", "yes|no"), tok.encode("yes", add_special_tokens=False),
             [eos(tok), stop])
    logits = torch.randn(1, len(tok))
    logits[0, eos(tok)] = float("-inf")  # as min_tokens bans it
    rows.mask(logits, ["a"])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == sorted([eos(tok), stop])


def test_unconstrained_rows_are_untouched(rows, tok):
    rows.add("c", SO, [], [eos(tok)])
    logits = torch.randn(3, len(tok))
    before = logits.clone()
    rows.mask(logits, ["free1", "c", "free2"])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert not torch.isfinite(logits[1]).all()


def test_a_recreated_state_continues_where_the_request_was(rows, tok):
    rows.add("first", SO, [], [eos(tok)])
    out = generate(rows, "first", len(tok), eos(tok), seed=3)
    half = out[: len(out) // 2]
    # the same request recreated (preemption, or the decode side of PD) with its outputs so far
    rows.add("again", SO, half, [eos(tok)])
    stepwise = GrammarRows(rows._make_compiler)
    stepwise.add("s", SO, [], [eos(tok)])
    for t in half:
        stepwise.advance(["s"], [t])
    a, b = torch.zeros(1, len(tok)), torch.zeros(1, len(tok))
    rows.mask(a, ["again"])
    stepwise.mask(b, ["s"])
    assert torch.equal(a, b)
    assert torch.isfinite(a[0, out[len(half)]])  # the token the request went on with is allowed


def test_dropped_and_disabled_rows_are_not_masked(compiler, tok):
    on, off = GrammarRows(lambda: compiler), GrammarRows(lambda: compiler, enabled=False)
    on.add("a", SO, [], [eos(tok)])
    off.add("a", SO, [], [eos(tok)])
    on.drop("a")
    for r in (on, off):
        logits = torch.zeros(1, len(tok))
        r.mask(logits, ["a"])
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("so, named", [
    (StructuredOutput("json_schema", json.dumps({"type": "array", "uniqueItems": True})), "uniqueItems"),
    (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
    (StructuredOutput("regex", "a(b"), "unclosed group"),
    (StructuredOutput("lark", "start: missing_rule"), "missing_rule"),
    (StructuredOutput("yaml", "x"), "unknown structured output kind"),
])
def test_the_compiler_names_what_it_refuses(compiler, so, named):
    with pytest.raises(InvalidParam, match=named) as info:
        compiler.check(so)
    assert info.value.param == "structured"
