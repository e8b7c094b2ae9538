"""W1 offline throughput: N requests at once, xllm against transformers, output tokens/s.

    python -m bench.w1_offline [--requests 256] [--peers generate,cb] [--launch-args="..."]

Prompts of 64–512 random tokens and outputs of 32–256 tokens (uniform, seeded), greedy,
EOS ignored. xllm gets them all at once through the SDK, before and after the peers;
transformers ``generate`` (static batches) and transformers continuous batching get the
same requests in this process, on the same checkpoint and dtype.
"""

from __future__ import annotations

import shlex
import sys

import uvloop

from xllm.sdk import AsyncClient

from .common import (add_launch_args, base_parser, offline_requests, report, resolve_model, summarize, table,
                     vocab_size)
from .drive import check, deployment, run_concurrent, warm_up

PEERS = {"generate": "transformers generate", "cb": "transformers continuous batching"}


def parse_range(text: str) -> tuple[int, int]:
    """``"64,512"`` -> (64, 512)."""
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


async def run_xllm(address: str, requests, vocab: int) -> dict:
    """Warm the deployment up, run the workload, return its summary and the engine's counters."""
    async with AsyncClient(address) as client:
        await warm_up(client, vocab)
        await client.call("reset_prefix_cache")  # a second run must compute its prompts too
        before = await client.call("stats")
        records, wall = await run_concurrent(client, requests, "xllm")
        after = await client.call("stats")
    check(records, requests, "xllm")
    out = summarize(records, wall)
    steps = after["num_steps"] - before["num_steps"]
    out["steps"] = steps
    out["tokens_per_step"] = (after["total_scheduled_tokens"] - before["total_scheduled_tokens"]) / max(steps, 1)
    out["preemptions"] = after["num_preemptions"] - before["num_preemptions"]
    return out


def run_peer(name: str, model, requests, batch_size: int) -> tuple[int, float]:
    """Warm up, then run one transformers system on the workload: (output tokens, seconds)."""
    from .peers import hf_continuous, hf_generate

    warm = [type(r)(r.prompt[:32], 4) for r in requests[:4]]
    if name == "generate":
        hf_generate(model, warm, batch_size)
        return hf_generate(model, requests, batch_size)
    hf_continuous(model, warm)
    return hf_continuous(model, requests)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=256, help="requests in the workload")
    p.add_argument("--prompt-len", default="64,512", help="prompt length range MIN,MAX")
    p.add_argument("--output-len", default="32,256", help="output length range MIN,MAX")
    p.add_argument("--peers", default="generate,cb", help="comma list of generate, cb; or none")
    p.add_argument("--hf-batch-size", type=int, default=16, help="static batch size of generate")
    add_launch_args(p)
    args = p.parse_args(argv)
    peers = [] if args.peers == "none" else args.peers.split(",")
    if unknown := set(peers) - set(PEERS):
        p.error(f"unknown peers: {', '.join(sorted(unknown))}")
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    requests = offline_requests(args.requests, vocab, args.seed, parse_range(args.prompt_len),
                                parse_range(args.output_len))

    # xllm runs first and last, around the peers (its deployment idles meanwhile): on this
    # shared machine a drift between the two shows in the table instead of in a ratio.
    results: list[tuple[str, int, float]] = []  # (system, output tokens, seconds)
    runs: list[dict] = []
    with deployment(model_dir, shlex.split(args.launch_args)) as dep:
        runs.append(uvloop.run(run_xllm(dep.address, requests, vocab)))
        results.append(("xllm (first)" if peers else "xllm", runs[0]["output_tokens"], runs[0]["duration"]))
        print(f"xllm: {runs[0]['output_throughput']:.1f} output tok/s", flush=True)
        if peers:
            from .peers import load_hf

            model = load_hf(model_dir)
            for name in peers:
                tokens, wall = run_peer(name, model, requests, args.hf_batch_size)
                results.append((PEERS[name], tokens, wall))
                print(f"{PEERS[name]}: {tokens / wall:.1f} output tok/s", flush=True)
            del model
            runs.append(uvloop.run(run_xllm(dep.address, requests, vocab)))
            results.append(("xllm (last)", runs[1]["output_tokens"], runs[1]["duration"]))
            print(f"xllm: {runs[1]['output_throughput']:.1f} output tok/s", flush=True)

    base = next((t / s for n, t, s in results if n == PEERS["generate"]), None)
    rows = [[n, len(requests), t, s, t / s, f"{t / s / base:.2f}×" if base else "-"] for n, t, s in results]
    body = table(["system", "requests", "output tokens", "seconds", "output tok/s", "vs generate"], rows)
    notes = [f"model {model_dir.name}; prompts {args.prompt_len}, outputs {args.output_len} tokens "
             f"(uniform, seed {args.seed}); greedy, EOS ignored; generate: static batches of "
             f"{args.hf_batch_size}, tokens asked for counted; continuous batching: 64 requests and 2,048 "
             "tokens per step, a cache for 64 requests of mean length (bench.peers.hf_continuous)",
             "xllm runs before and after the peers (prefix cache cleared each time)"]
    for label, xl in zip(("first", "last"), runs):
        notes.append(f"xllm ({label}): {xl['steps']} engine steps, {xl['tokens_per_step']:.1f} tokens/step, "
                     f"{xl['preemptions']} preemptions; TTFT mean {xl['ttft']['mean']:.2f} s, "
                     f"TPOT mean {xl['tpot']['mean'] * 1000:.1f} ms")
    cb = next((t / s for n, t, s in results if n == PEERS["cb"]), None)
    if cb:
        ratios = " / ".join(f"{xl['output_throughput'] / cb:.2f}×" for xl in runs)
        notes.append(f"xllm vs continuous batching (first / last): {ratios}")
    report(f"W1 offline throughput, {len(requests)} requests", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
