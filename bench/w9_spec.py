"""W9: speculative decoding on a real model, against no speculation, in one run.

    python -m bench.w9_spec [--methods none,suffix,ngram] [--max-tokens 128] [--rounds 2]
    python -m bench.w9_spec --phases "open batch 32" --rounds 5

Two kinds of task through the model's chat template, greedy:

- input-grounded: edit a function given in full, or re-lay a given text (functions and
  module docstrings of this Python's standard library); the answer repeats much of the
  input, which the model-free proposers can draft from;
- open generation: a story, a poem, a description, a list of ideas (little to copy).

Every request is distinct: with repeats, ``suffix``'s index of recent outputs would draft
a request from an identical earlier answer, which says nothing about either task.

Every method's deployment runs at once (one after the other would compare them under
whatever else the machine was doing at the time), idle but for the method being measured:
single stream alternates methods request by request, a batch phase runs each method's
batch in turn, ``--rounds`` times, the order reversed every round. Decode tokens/s of one
stream = (output tokens - 1) / (E2EL - TTFT), the mean over its requests; of a batch,
output tokens over the wall time, the median over the rounds. Phases: single stream,
batch 8 and, on open generation, batch 32 (where ``--speculative-max-batch`` keeps
speculation off: the check that it costs nothing there). Draft tokens proposed and
accepted come from each deployment's counters (``stats``), per phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys

from xllm.models.loader import load_tokenizer
from xllm.sdk import AsyncClient

from .common import BenchRequest, add_launch_args, base_parser, report, resolve_model, table
from .drive import check, deployment, run_concurrent, stream_request, warm_up

# Grounded inputs come from the Python standard library of the machine: its modules' prose
# docstrings and its functions' source (every request distinct, so the suffix proposer's
# index of recent outputs cannot draft one request from another's identical answer).
MODULES = ("textwrap", "shlex", "fnmatch", "posixpath", "json.encoder", "json.decoder", "string", "difflib",
           "calendar", "csv", "glob", "heapq", "bisect", "statistics", "fractions", "ipaddress", "pprint",
           "copy", "functools", "base64", "colorsys", "zipfile", "tarfile", "gzip", "shutil", "tempfile",
           "random", "urllib.parse", "email.utils", "html", "mimetypes", "platform", "locale", "gettext",
           "operator", "keyword", "configparser", "sched", "queue", "cmd", "code", "codeop", "filecmp",
           "linecache", "tabnanny", "trace", "getopt", "optparse", "secrets", "hmac", "uuid", "ntpath", "os")
CODE_EDITS = ("Add a docstring to this function and return the whole function:",
              "Add type hints to this function and return the whole function, changing nothing else:",
              "Rename the function's first parameter to `value` everywhere and return the whole function:")
TEXT_EDITS = ("Copy this text and put every sentence on its own line:",
              "Rewrite the following text, fixing any spelling mistakes and changing nothing else:")
SUBJECTS = ("a robot who learns to paint", "a lighthouse keeper", "a city under the sea", "a lost kitten",
            "the first day at a new school", "a dragon who is afraid of fire", "a journey across a desert",
            "a clock that runs backwards", "a library at night", "two rival bakers", "a storm at sea",
            "a garden on the moon", "an old map", "a talking tree", "a train that never stops",
            "a village in the mountains", "a detective who cannot see", "a festival of lights",
            "a scientist's last experiment", "a forgotten song", "a bridge between two worlds",
            "a winter without snow", "a market in the sky", "the last bookshop")
OPEN_TEMPLATES = ("Write a short story about {}.", "Write a poem about {}.", "Describe {} in vivid detail.",
                  "List ten ideas for a film about {}, with one sentence each.", "Write a diary entry about {}.",
                  "Tell a fairy tale about {}.", "Write the opening page of a novel about {}.",
                  "Write a song about {}.")


def grounded_texts(n: int) -> list[str]:
    """``n`` distinct input-grounded tasks: edit a function, or re-lay a docstring, given in full."""
    import importlib
    import inspect

    code, prose = [], []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if 300 <= len(mod.__doc__ or "") <= 1500:
            prose.append(mod.__doc__.strip())
        for fname, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__ or fname.startswith("_"):
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            if 400 <= len(src) <= 1200:
                code.append(src)
    texts = []
    for i in range(n):
        if i % 2 == 0 or not prose:
            texts.append(f"{CODE_EDITS[i // 2 % len(CODE_EDITS)]}\n\n```python\n{code[i // 2 % len(code)]}```")
        else:
            texts.append(f"{TEXT_EDITS[i // 2 % len(TEXT_EDITS)]}\n\n{prose[i // 2 % len(prose)]}")
    if len(set(texts)) < n:
        raise RuntimeError(f"this Python's standard library gives fewer than {n} distinct grounded tasks")
    return texts


def open_texts(n: int) -> list[str]:
    """``n`` distinct open-generation tasks."""
    texts = [t.format(s) for s in SUBJECTS for t in OPEN_TEMPLATES]
    if n > len(texts):
        raise ValueError(f"at most {len(texts)} open tasks")
    return texts[:n]


def prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def spec_counters(stats: dict) -> tuple[int, int, int]:
    return stats.get("spec_num_drafts", 0), stats.get("spec_draft_tokens", 0), stats.get("spec_accepted_tokens", 0)


async def counters(address: str) -> tuple[int, int, int]:
    async with AsyncClient(address) as c:
        return spec_counters(await c.call("stats"))


async def one_stream(address: str, req: BenchRequest) -> float:
    """Decode tokens/s of one streamed request."""
    async with AsyncClient(address) as c:
        rec = await stream_request(c, req)
    check([rec], [req], "w9")
    return (rec.output_tokens - 1) / (rec.e2el - rec.ttft)


async def one_batch(address: str, requests: list[BenchRequest]) -> float:
    """Output tokens/s of a batch sent at once."""
    async with AsyncClient(address) as c:
        records, wall = await run_concurrent(c, requests, desc="batch")
    check(records, requests, "w9")
    return sum(r.output_tokens for r in records) / wall


def run_phase(deps: dict, rounds: list[list[BenchRequest]], concurrent: bool) -> dict[str, tuple]:
    """Each method's rate in this phase and the draft counters the phase added; each round's
    requests go to every method, the methods' order reversed every other round."""
    before = {m: asyncio.run(counters(d.address)) for m, d in deps.items()}
    rates: dict[str, list[float]] = {m: [] for m in deps}
    order = list(deps)
    for k, requests in enumerate(rounds):
        turn = order if k % 2 == 0 else order[::-1]
        if concurrent:
            for m in turn:
                rates[m].append(asyncio.run(one_batch(deps[m].address, requests)))
        else:
            for req in requests:
                for m in turn:
                    rates[m].append(asyncio.run(one_stream(deps[m].address, req)))
    out = {}
    for m, d in deps.items():
        after = asyncio.run(counters(d.address))
        rate = statistics.median(rates[m]) if concurrent else statistics.fmean(rates[m])
        out[m] = (rate, tuple(x - y for x, y in zip(after, before[m])))
    return out


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
    p.add_argument("--rounds", type=int, default=2, help="rounds of every phase (new requests each), methods alternating")
    p.add_argument("--phases", default="", help="comma-separated phase names to run (default: every phase), "
                                                 "e.g. 'open batch 32'")
    add_launch_args(p)
    args = p.parse_args(argv)
    model = resolve_model(args.model)
    tok = load_tokenizer(model)
    phases = {"grounded, 1 stream": ("grounded", 4, False), "open, 1 stream": ("open", 4, False),
              "grounded, batch 8": ("grounded", 8, True), "open, batch 8": ("open", 8, True),
              "open, batch 32": ("open", 32, True)}
    if args.phases:
        wanted = {name.strip() for name in args.phases.split(",")}
        unknown = wanted - {name.replace(",", "") for name in phases}
        if unknown:
            p.error(f"unknown phases {sorted(unknown)}; the phases: {', '.join(n.replace(',', '') for n in phases)}")
        phases = {name: v for name, v in phases.items() if name.replace(",", "") in wanted}
    need = {kind: args.rounds * sum(n for k, n, _ in phases.values() if k == kind) for kind in ("grounded", "open")}
    pools = {"grounded": iter(prompts(tok, grounded_texts(need["grounded"]))),
             "open": iter(prompts(tok, open_texts(need["open"])))}
    # every round of every phase gets requests no deployment has seen
    work = {name: ([[BenchRequest(next(pools[kind]), args.max_tokens) for _ in range(n)]
                    for _ in range(args.rounds)], concurrent) for name, (kind, n, concurrent) in phases.items()}
    methods = args.methods.split(",")
    results: dict[str, dict[str, tuple]] = {}
    with contextlib.ExitStack() as stack:
        deps = {}
        for method in methods:
            flags = ["--max-num-seqs", "32", *args.launch_args.split()]
            if method != "none":
                flags += ["--speculative", method, "--num-speculative-tokens", str(args.num_speculative_tokens)]
            deps[method] = stack.enter_context(deployment(model, flags, label=method))
            asyncio.run(_warm(deps[method].address))
        for name, (rounds, concurrent) in work.items():
            results[name] = run_phase(deps, rounds, concurrent)
            for m in methods:
                print(f"  {m:7s} {name:20s} {results[name][m][0]:7.1f} tok/s  {acceptance(results[name][m][1])}",
                      flush=True)
    rows = []
    for name, by_method in results.items():
        base = by_method.get("none", (None,))[0]
        for m in methods:
            rate, counts = by_method[m]
            rows.append([name, m, rate, f"{rate / base:.2f}×" if base else "-", acceptance(counts)])
    notes = [f"model {model.name}; greedy, {args.max_tokens} output tokens per request (EOS ignored); "
             "grounded: edit a function or re-lay a docstring of this Python's standard library, given in full; "
             "open: stories, poems, descriptions; every request distinct (none repeats another's answer); "
             "1 stream: mean decode tok/s per request; batch: output tok/s over the wall time (median of rounds)",
             f"every method's deployment up at once, methods alternating request by request (1 stream) or "
             f"batch by batch, {args.rounds} rounds",
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
