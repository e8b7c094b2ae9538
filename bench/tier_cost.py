"""What a prompt's KV costs from each tier: the router's tier weights, measured.

    python -m bench.tier_cost [--model preset:llama-110m] [--dtype float32] [--prompt-len 1024] [--rounds 3]

One instance with a small device pool, a host tier and a disk tier. Each round takes a
fresh prompt (``--prompt-len`` tokens) and times the first token of the same next turn
(the prompt plus ``--tail-len`` new tokens, streamed) in four states of its history:

- **device**: the history is still in the device pool (a prefix-cache hit);
- **host**: other prompts pushed it out of the device pool into host memory;
- **disk**: more of them pushed it out of host memory onto disk too;
- **recompute**: never seen (a new prompt of the same length): everything is computed.

Per token of history: prefill = (recompute − device) / prompt_len. The load-back costs
are the KV agent's own timings (``stats``): host = its time copying blocks into the device
pool per token loaded, disk = its time reading and checking block files per token fetched,
plus the host's (a disk block comes back through host memory). The weights the router's
``prefix_cache_aware`` uses (``--router-tier-weights``) are a hit's cost over prefill's,
where a hit's cost is the larger of its load-back and what a turn actually paid per token,
(host or disk − device) / prompt_len: a load hidden behind the forward pass costs about
its copy; a fetch from disk, which the request waits for, costs what it made the turn
wait. Medians over the rounds, after one round that is not counted (first-use costs).
"""

from __future__ import annotations

import asyncio
import random
import shlex
import statistics
import sys
import tempfile
import time

import uvloop

from xllm.sdk import AsyncClient

from .common import add_launch_args, base_parser, random_prompt, report, resolve_model, table, vocab_size
from .drive import deployment, warm_up

BS = 16


async def first_token(c: AsyncClient, prompt: list[int]) -> float:
    """Seconds from sending ``prompt`` to its first streamed token."""
    t0 = time.perf_counter()
    async for delta in c.stream(prompt_token_ids=prompt, max_tokens=2, temperature=0.0, ignore_eos=True):
        if delta.token_ids:
            dt = time.perf_counter() - t0
            break
    return dt


async def settle(c: AsyncClient) -> None:
    """Until no block is held (the agent's copies of the last request are done)."""
    while (await c.call("check_integrity"))["used"]:
        await asyncio.sleep(0.02)


async def push_out(c: AsyncClient, rng: random.Random, vocab: int, blocks: int, prompt_len: int) -> None:
    """Send other prompts, ``blocks`` blocks of them in all, one after another."""
    for _ in range(-(-blocks * BS // prompt_len)):
        await first_token(c, random_prompt(rng, prompt_len, vocab))
    await settle(c)


async def measure(address: str, vocab: int, args, device_blocks: int, host_blocks: int, n: int) -> list[dict]:
    rng = random.Random(args.seed)
    rounds = []
    async with AsyncClient(address) as c:
        await warm_up(c, vocab)
        for r in range(n):
            history = random_prompt(rng, args.prompt_len, vocab)

            def turn() -> list[int]:  # the history and a new turn (its own blocks are never cached)
                return history + random_prompt(rng, args.tail_len, vocab)

            row = {"recompute": await first_token(c, random_prompt(rng, args.prompt_len + args.tail_len, vocab))}
            await first_token(c, history)
            await settle(c)
            row["device"] = await first_token(c, turn())
            await settle(c)
            before = await c.call("stats")
            await push_out(c, rng, vocab, 2 * device_blocks, args.prompt_len)  # off the device, not off host
            row["host"] = await first_token(c, turn())
            await settle(c)
            mid = await c.call("stats")
            await push_out(c, rng, vocab, 2 * host_blocks, args.prompt_len)  # off host memory: on disk
            row["disk"] = await first_token(c, turn())
            await settle(c)
            after = await c.call("stats")
            row["host_blocks"] = mid["kv_host_loaded_blocks"] - before["kv_host_loaded_blocks"]
            row["disk_blocks"] = after["kv_disk_fetched_blocks"] - mid["kv_disk_fetched_blocks"]
            row["host_copy"] = (mid["kv_load_seconds"] - before["kv_load_seconds"]) / max(row["host_blocks"], 1) / BS
            row["disk_read"] = (after["kv_fetch_seconds"] - mid["kv_fetch_seconds"]) / max(row["disk_blocks"], 1) / BS
            print(f"round {r}: " + ", ".join(f"{k} {v * 1000:.3g} ms" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in row.items()), flush=True)
            rounds.append(row)
    return rounds[1:]  # the first pays first-use costs


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt-len", type=int, default=1024, help="tokens of the history")
    p.add_argument("--tail-len", type=int, default=32, help="tokens of the next turn past the history")
    p.add_argument("--rounds", type=int, default=3, help="rounds counted (after one that is not)")
    add_launch_args(p)
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    history_blocks = args.prompt_len // BS
    device_blocks = 2 * history_blocks + 16  # a history and a turn fit; a few more prompts push it out
    host_blocks = 6 * history_blocks  # the host tier keeps it while the device lets it go
    disk = tempfile.mkdtemp(prefix="xllm-bench-disk-")
    from xllm.config import read_hf_config

    cfg = read_hf_config(model_dir)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    block_bytes = 2 * cfg["num_hidden_layers"] * BS * cfg["num_key_value_heads"] * head_dim * (
        4 if args.dtype == "float32" else 2)
    flags = ["--dtype", args.dtype, "--block-size", str(BS), "--num-kv-blocks", str(device_blocks),
             "--kv-host-memory", repr(host_blocks * block_bytes / 2**30), "--kv-disk-dir", disk,
             "--kv-disk-size", repr(40 * history_blocks * block_bytes / 2**30), *shlex.split(args.launch_args)]
    with deployment(model_dir, flags, "tiers") as dep:
        rounds = uvloop.run(measure(dep.address, vocab, args, device_blocks, host_blocks, args.rounds + 1))
    med = {k: statistics.median(r[k] for r in rounds)
           for k in ("recompute", "device", "host", "disk", "host_copy", "disk_read")}
    n = args.prompt_len
    prefill = (med["recompute"] - med["device"]) / n
    paid = {state: max(0.0, med[state] - med["device"]) / n for state in ("device", "host", "disk", "recompute")}
    load = {"device": 0.0, "host": med["host_copy"], "disk": med["disk_read"] + med["host_copy"], "recompute": prefill}
    cost = {state: max(paid[state], load[state]) for state in paid}
    rows = [[state, med[state] * 1000, paid[state] * 1e6, load[state] * 1e6, cost[state] / prefill]
            for state in ("device", "host", "disk", "recompute")]
    body = table(["history from", "median TTFT ms", "paid µs per history token (TTFT over a device hit)",
                  "load-back µs per token (the agent's copy)", "weight: max(paid, load-back) / prefill"], rows)
    host, disk_cost = cost["host"], cost["disk"]
    notes = [f"model {model_dir.name} ({args.dtype}), one instance, block size {BS}, device pool {device_blocks} "
             f"blocks, host tier {host_blocks} blocks, disk tier in a temporary directory",
             f"history {n} tokens, next turn +{args.tail_len} tokens, {args.rounds} rounds (medians); blocks loaded "
             f"from host per round {[r['host_blocks'] for r in rounds]}, fetched from disk "
             f"{[r['disk_blocks'] for r in rounds]}",
             f"tier weights for --router-tier-weights: host {host / prefill:.3f}, disk {disk_cost / prefill:.3f} "
             f"(prefill {prefill * 1e6:.0f} µs per token)"]
    report("KV tier costs (router weights)", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
