"""W9: speculative decoding on a real model, against no speculation, in one run.

    python -m bench.w9_spec [--methods none,suffix,ngram] [--max-tokens 128]

Two kinds of task through the model's chat template, greedy:

- input-grounded: rewrite a given passage, or edit given code (the answer repeats much of
  the input, which the model-free proposers can draft from);
- open generation: a story, an explanation, a list of ideas (little to copy).

For each method a fresh deployment serves, after a warm-up: single stream (one request at
a time; decode tokens/s = (output tokens - 1) / (E2EL - TTFT), the mean over the tasks),
batch 8 (eight requests at once; output tokens/s over the wall time) and, on open
generation, batch 32 (where ``--speculative-max-batch`` keeps speculation off: the check
that it costs nothing there). Draft tokens proposed and accepted come from the
deployment's counters (``stats``), per phase.
"""

from __future__ import annotations

import asyncio
import sys

from xllm.models.loader import load_tokenizer
from xllm.sdk import AsyncClient

from .common import BenchRequest, add_launch_args, base_parser, report, resolve_model, table
from .drive import check, deployment, run_concurrent, stream_request, warm_up

PASSAGE = ("The old harbour town woke slowly. Fishermen carried their nets down to the boats, the baker "
           "opened his shutters, and the smell of fresh bread drifted along the quay. Children ran "
           "past the fountain on their way to school, and the church bell rang eight times. By noon the "
           "market square was full of voices, and the gulls circled above the fish stalls.")
CODE = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        total += item["price"] * item["quantity"]
    total = total * (1 + tax_rate)
    return round(total, 2)


def cheapest(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
'''
GROUNDED = [
    f"Rewrite the following text in the past perfect tense, changing nothing else:\n\n{PASSAGE}",
    f"Rename the function total_price to compute_total in this code and return the whole code:\n\n{CODE}",
    f"Copy this text and put every sentence on its own line:\n\n{PASSAGE}",
    f"Add a docstring to each function of this code and return the whole code:\n\n{CODE}",
]
OPEN = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, for a ten-year-old.",
    "List ten ideas for a weekend trip, with one sentence each.",
    "Describe the life cycle of a star.",
]


def prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def spec_counters(stats: dict) -> tuple[int, int, int]:
    return stats.get("spec_num_drafts", 0), stats.get("spec_draft_tokens", 0), stats.get("spec_accepted_tokens", 0)


async def phase(address: str, requests: list[BenchRequest], concurrent: bool) -> tuple[float, tuple]:
    """Decode tokens/s of the phase and the draft counters it added."""
    async with AsyncClient(address) as c:
        before = spec_counters(await c.call("stats"))
        if concurrent:
            records, wall = await run_concurrent(c, requests, desc="batch")
            rate = sum(r.output_tokens for r in records) / wall
        else:
            records = [await stream_request(c, r) for r in requests]
            rate = sum((r.output_tokens - 1) / (r.e2el - r.ttft) for r in records) / len(records)
        check(records, requests, "w9")
        after = spec_counters(await c.call("stats"))
    return rate, tuple(a - b for a, b in zip(after, before))


def acceptance(counts: tuple) -> str:
    drafts, proposed, accepted = counts
    if not proposed:
        return "-"
    return f"{accepted / proposed:.0%} of {proposed}, {1 + accepted / drafts:.2f} tok/step"


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.set_defaults(model="preset:smollm2-135m-instruct")
    p.add_argument("--methods", default="none,suffix,ngram")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    add_launch_args(p)
    args = p.parse_args(argv)
    model = resolve_model(args.model)
    tok = load_tokenizer(model)
    grounded = [BenchRequest(x, args.max_tokens) for x in prompts(tok, GROUNDED)]
    open_ = [BenchRequest(x, args.max_tokens) for x in prompts(tok, OPEN)]
    phases = {"grounded, 1 stream": (grounded, False), "open, 1 stream": (open_, False),
              "grounded, batch 8": (grounded * 2, True), "open, batch 8": (open_ * 2, True),
              "open, batch 32": (open_ * 8, True)}
    results: dict[str, dict[str, tuple]] = {}
    for method in args.methods.split(","):
        flags = ["--max-num-seqs", "32", *args.launch_args.split()]
        if method != "none":
            flags += ["--speculative", method, "--num-speculative-tokens", str(args.num_speculative_tokens)]
        with deployment(model, flags, label=method) as dep:
            asyncio.run(_warm(dep.address))
            for name, (reqs, concurrent) in phases.items():
                results.setdefault(name, {})[method] = asyncio.run(phase(dep.address, reqs, concurrent))
                print(f"  {method:7s} {name:20s} {results[name][method][0]:7.1f} tok/s  "
                      f"{acceptance(results[name][method][1])}", flush=True)
    methods = args.methods.split(",")
    rows = []
    for name, by_method in results.items():
        base = by_method.get("none", (None,))[0]
        for m in methods:
            rate, counts = by_method[m]
            rows.append([name, m, rate, f"{rate / base:.2f}×" if base else "-", acceptance(counts)])
    notes = [f"model {model.name}; greedy, {args.max_tokens} output tokens per request (EOS ignored); "
             f"{len(GROUNDED)} grounded tasks (rewrite a passage, edit code) and {len(OPEN)} open ones; "
             "1 stream: mean decode tok/s per request; batch: output tok/s over the wall time",
             f"--num-speculative-tokens {args.num_speculative_tokens}, --speculative-max-batch 8 (the default), "
             "--max-num-seqs 32"]
    report("W9 speculative decoding", table(["phase", "method", "tok/s", "vs none", "drafts accepted"], rows),
           args, notes)
    return 0


async def _warm(address: str) -> None:
    async with AsyncClient(address) as c:
        await warm_up(c, 0)


if __name__ == "__main__":
    sys.exit(main())
