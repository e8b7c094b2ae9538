"""Grammar libraries compared: per-token mask cost and compile time, on this CPU.

    python -m bench.grammar_mask [--batches 1,32] [--steps 64] [--threads 1,2]

For xgrammar and llguidance, with the vocabulary of a real tokenizer (``preset:llama-110m``:
a Llama-3-style byte-level BPE of 32,000 ids) and a realistic JSON schema (``SCHEMA``: an
order with a customer, a bounded list of items, enums, numbers, booleans):

- compile: seconds to turn the schema into a grammar ready for matchers (a fresh compiler,
  nothing cached; the tokenizer's one-time preprocessing is its own column);
- per step at batch B: fill the (B, V/32) bitmask of B matchers with the library's batched
  call, apply it to (B, V) float32 logits in one op, and advance every matcher with the
  token picked from the masked random logits. A matcher whose grammar ends is reset (a new
  request takes its row), so every step has B constrained rows.

The apply op is the same for both (``xllm.worker.grammar.apply_bitmask``), so the fill and
advance columns are what tells the libraries apart. Figures are medians over the steps.

A second table probes what each library does with schemas it cannot enforce
(``UNSUPPORTED``) and with a Lark grammar: refusing with a message (which the frontend
can turn into a 400 naming the keyword) or accepting silently (and then generating
output the schema does not allow).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from xllm.models.loader import load_tokenizer
from xllm.worker.grammar import apply_bitmask

from .common import base_parser, report, resolve_model, table, vocab_size

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "maxLength": 60},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "email"],
        },
        "items": {
            "type": "array",
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
            },
        },
        "notes": {"type": "string", "maxLength": 80},
        "total": {"type": "number"},
    },
    "required": ["order_id", "status", "customer", "items", "total"],
}


UNSUPPORTED = {
    "if/then": {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
    "not": {"not": {"type": "string"}},
    "uniqueItems": {"type": "array", "uniqueItems": True},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
}
LARK = 'start: "yes" | "no"'


class LLGuidance:
    """llguidance: LLMatcher per request, LLExecutor fills a batch of masks in parallel."""

    name = "llguidance"

    def __init__(self, hf_tok, vocab: int, threads: int) -> None:
        import llguidance
        import llguidance.hf

        self.lib = llguidance
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
        self.tokenizer_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: str):
        grammar = self.lib.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        m = self.lib.LLMatcher(self.tok, grammar)  # compiling is building the first matcher
        assert not m.is_error(), m.get_error()
        return grammar

    def matcher(self, grammar):
        return self.lib.LLMatcher(self.tok, grammar)

    def refusal(self, schema: str | None) -> str:
        """The library's message for a schema (None: the Lark grammar), or "" when accepted."""
        m = self.lib.LLMatcher
        grammar = m.grammar_from_lark(LARK) if schema is None else m.grammar_from_json_schema(schema)
        is_error, messages = m.validate_grammar_with_warnings(grammar, self.tok)
        return messages[0] if is_error else ""

    def fill(self, matchers, bitmask: torch.Tensor) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              bitmask.shape[1] * 4, bitmask.shape[0])

    def advance(self, matchers, tokens: list[int]) -> list:
        out = []
        for m, t in zip(matchers, tokens):
            assert m.consume_token(t), m.get_error()
            out.append(m.is_stopped())
        return out


class XGrammar:
    """xgrammar: GrammarMatcher per request, BatchGrammarMatcher fills a batch of masks."""

    name = "xgrammar"

    def __init__(self, hf_tok, vocab: int, threads: int) -> None:
        import xgrammar

        self.lib = xgrammar
        t0 = time.perf_counter()
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
        self.tokenizer_s = time.perf_counter() - t0
        self.threads = threads
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: str):
        compiler = self.lib.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        return compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, grammar):
        return self.lib.GrammarMatcher(grammar)

    def refusal(self, schema: str | None) -> str:
        """The library's message for a schema (None: a Lark grammar), or "" when accepted."""
        if schema is None:
            return "no Lark front end (EBNF/GBNF only)"
        try:
            self.compile(schema)
        except Exception as exc:  # noqa: BLE001 - whatever it raises is its refusal
            return str(exc).strip().splitlines()[-1]
        return ""

    def fill(self, matchers, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matchers, tokens: list[int]) -> list:
        out = []
        for m, t in zip(matchers, tokens):
            assert m.accept_token(t)
            out.append(m.is_terminated())
        return out


def measure(lib, batch: int, steps: int, vocab: int, compiles: int = 3) -> list:
    """[compile s, fill ms, apply ms, advance ms, per-token ms] medians for one library."""
    text = json.dumps(SCHEMA)
    compile_s = []
    for _ in range(compiles):
        t0 = time.perf_counter()
        grammar = lib.compile(text)
        compile_s.append(time.perf_counter() - t0)
    matchers = [lib.matcher(grammar) for _ in range(batch)]
    bitmask = torch.zeros(batch, (vocab + 31) // 32, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    fill, apply, advance = [], [], []
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=gen)
        t0 = time.perf_counter()
        lib.fill(matchers, bitmask)
        t1 = time.perf_counter()
        apply_bitmask(logits, bitmask)
        t2 = time.perf_counter()
        tokens = logits.argmax(dim=-1).tolist()
        t3 = time.perf_counter()
        done = lib.advance(matchers, tokens)
        t4 = time.perf_counter()
        fill.append(t1 - t0)
        apply.append(t2 - t1)
        advance.append(t4 - t3)
        for i, d in enumerate(done):
            if d:
                matchers[i] = lib.matcher(grammar)
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    per_step = med([a + b + c for a, b, c in zip(fill, apply, advance)])
    return [statistics.median(compile_s) * 1e3, lib.tokenizer_s * 1e3, med(fill), med(apply), med(advance),
            per_step, per_step / batch]


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,32")
    p.add_argument("--steps", type=int, default=64, help="steps timed per batch size")
    p.add_argument("--threads", default="1,2", help="threads the libraries may use for a batch")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = resolve_model(args.model)
    vocab = vocab_size(model)
    hf_tok = load_tokenizer(model)
    rows, libs = [], {}
    for threads in [int(t) for t in args.threads.split(",")]:
        for cls in (XGrammar, LLGuidance):
            lib = cls(hf_tok, vocab, threads)
            libs[lib.name] = lib
            for b in [int(x) for x in args.batches.split(",")]:
                rows.append([lib.name, threads, b, *measure(lib, b, args.steps, vocab)])
    headers = ["library", "threads", "batch", "compile ms", "tokenizer prep ms", "fill ms", "apply ms",
               "advance ms", "per step ms", "per row ms"]
    notes = [f"model {model.name} tokenizer, vocab {vocab}; {args.steps} steps per row, medians; "
             "schema: bench.grammar_mask.SCHEMA (order: pattern, enum, nested object, array of objects)",
             "fill = the library's batched mask call; apply = one branch-free select over (B, V); "
             "advance = consume the picked token in every matcher; torch on 1 thread"]
    probes = [[name, *(_verdict(lib, json.dumps(schema)) for lib in libs.values())] for name, schema in UNSUPPORTED.items()]
    probes.append(["a Lark grammar (the `lark` kind)", *(_verdict(lib, None, "accepted") for lib in libs.values())])
    body = table(headers, rows) + "\n\n" + table(["unsupported feature", *libs], probes)
    report("Grammar mask cost: xgrammar vs llguidance", body, args, notes)


def _verdict(lib, schema: str | None, accepted: str = "accepted silently (not enforced)") -> str:
    msg = lib.refusal(schema)
    return f"refused: {msg[:70]}".replace("|", "/") if msg else accepted


if __name__ == "__main__":
    main()
