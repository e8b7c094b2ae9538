"""W3 single stream: one request (prompt 32, 128 output tokens) against the eager loop
and the memory-bandwidth bound.

    python -m bench.w3_single [--repeats 5] [--launch-args="..."]

The bound is the bytes of weights one decode step reads (every weight but the input
embedding, of which one row is read) over the read bandwidth measured in this run by
summing a large tensor. The three alternate in rounds (the deployment idles while this
process runs the eager loop); figures are medians over the rounds.
"""

from __future__ import annotations

import os
import random
import shlex
import statistics
import sys

import torch
import uvloop

from xllm.sdk import AsyncClient

from .common import (BenchRequest, add_launch_args, base_parser, random_prompt, report, resolve_model, table,
                     vocab_size)
from .bounds import read_bandwidth
from .drive import deployment, stream_request, warm_up


def decode_weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter, the input embedding's one row aside."""
    params = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight.data_ptr() != emb.data_ptr():  # untied: the table is not streamed
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


async def run_all(address: str, model, req: BenchRequest, vocab: int, repeats: int) -> tuple[list, list, list]:
    """Per repeat, one after the other: xllm, the eager loop, the read bandwidth.

    The deployment idles (no CPU) while this process runs the eager loop, so alternating
    lets the machine's drift hit every figure alike. Times are (TTFT, TPOT, E2EL) seconds.
    """
    from .peers import hf_decode_loop

    xl, eager, bws = [], [], []
    async with AsyncClient(address) as client:
        await warm_up(client, vocab, n=1)
        hf_decode_loop(model, req.prompt, 8)
        for _ in range(repeats):
            await client.call("reset_prefix_cache")  # every repeat computes its prompt
            rec = await stream_request(client, req)
            if not rec.ok or rec.output_tokens != req.max_tokens:
                raise RuntimeError(f"xllm request failed or short: {rec.error or rec.output_tokens}")
            xl.append((rec.ttft, rec.tpot, rec.e2el))
            t = hf_decode_loop(model, req.prompt, req.max_tokens)
            eager.append((t[0], (t[-1] - t[0]) / (len(t) - 1), t[-1]))
            bws.append(read_bandwidth())
    return xl, eager, bws


def row(name: str, runs: list[tuple[float, float, float]], n: int, bound: float) -> list:
    """One table row from the medians of the runs."""
    ttft, tpot, e2e = (statistics.median(x) for x in zip(*runs))
    return [name, ttft * 1000, tpot * 1000, 1 / tpot, n / e2e, f"{100 / tpot / bound:.0f}%"]


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="rounds (each system once); medians are reported")
    add_launch_args(p)
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    req = BenchRequest(random_prompt(random.Random(args.seed), args.prompt_len, vocab), args.output_len)
    torch.set_num_threads(os.cpu_count() or 1)  # the worker's default: every core

    from .peers import load_hf

    model = load_hf(model_dir)
    with deployment(model_dir, shlex.split(args.launch_args)) as dep:
        xl, eager, bws = uvloop.run(run_all(dep.address, model, req, vocab, args.repeats))
    bw = statistics.median(bws)
    weights = decode_weight_bytes(model)
    bound = bw / weights

    rows = [row("xllm", xl, req.max_tokens, bound), row("transformers eager loop", eager, req.max_tokens, bound),
            ["bandwidth bound", "-", 1000 / bound, bound, bound, "100%"]]
    body = table(["system", "TTFT ms", "TPOT ms", "decode tok/s (1/TPOT)", "tok/s (end to end)",
                  "of the bound"], rows)
    xl_tps = 1 / statistics.median(r[1] for r in xl)
    notes = [f"model {model_dir.name}, {next(model.parameters()).dtype}; prompt {args.prompt_len}, "
             f"{args.output_len} output tokens; medians of {args.repeats} rounds (xllm, eager loop, bandwidth "
             f"alternating); {torch.get_num_threads()} threads",
             f"read bandwidth {bw / 1e9:.1f} GB/s (sum of a 1 GiB tensor); decode reads "
             f"{weights / 1e6:.0f} MB of weights per token",
             f"xllm vs the eager loop: {xl_tps * statistics.median(r[1] for r in eager):.2f}× (decode tok/s)"]
    report("W3 single stream", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
