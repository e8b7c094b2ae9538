"""The README's first command: launch a deployment, send it real requests, report.

    python -m xllm.demo [--model DIR|preset:NAME] [--requests N] [--max-tokens N]

Makes the built-in default model on first use (``llama-110m``: random weights, real
Llama layout, cached under ``~/.cache/xllm/models``), starts ``xllm-launch`` with it,
sends requests through the SDK all at once, prints a few answers and the throughput,
and shuts the deployment down.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from .deploy.harness import launch
from .sdk import AsyncClient

TOPICS = ["the sea", "a city at night", "old machines", "winter bread", "a quiet library",
          "trains", "the first snow", "a market"]


async def _run(address: str, n: int, max_tokens: int) -> None:
    rng = random.Random(0)
    async with AsyncClient(address) as client:
        info = await client.call("model_info")
        print(f"model {info['name']}: context {info['max_model_len']}, vocab {info['vocab_size']}")
        chat = [{"role": "user", "content": "Tell me about the sea."}]
        print("streamed chat reply: ", end="", flush=True)
        async for delta in client.stream(messages=chat, max_tokens=24, temperature=0.0):
            print(delta.text, end="", flush=True)
        print()
        prompts = [f"Write about {rng.choice(TOPICS)} in {rng.randint(2, 9)} lines." for _ in range(n)]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(client.generate(p, max_tokens=max_tokens, temperature=0.8,
                                                      seed=i, ignore_eos=True)
                                      for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
        for c, p in list(zip(done, prompts))[:3]:
            print(f"\n> {p}\n{c.text[:160]!r} [{len(c.token_ids)} tokens, {c.finish_reason}]")
        out_tokens = sum(len(c.token_ids) for c in done)
        in_tokens = sum(c.num_prompt_tokens for c in done)
        stats = await client.call("stats")
        print(f"\n{n} requests, {in_tokens} prompt + {out_tokens} output tokens in {wall:.2f} s: "
              f"{out_tokens / wall:.1f} output tokens/s, {n / wall:.2f} requests/s "
              f"({stats['num_steps']} engine steps)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xllm.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="preset:llama-110m", help="model directory or preset:NAME")
    p.add_argument("--requests", type=int, default=32, help="requests sent at once")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("launch_args", nargs="*", help="extra xllm-launch flags (after --)")
    args = p.parse_args(argv)
    if args.model.startswith("preset:"):
        from xllm_tools import ensure_model

        print(f"preparing {args.model} (made once, then cached)...", flush=True)
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
