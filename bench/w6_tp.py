"""Tensor parallelism on this machine: decode step time with --tp 1, --tp 2, and --tp 2
with micro-batch overlap, side by side in one run.

    python -m bench.w6_tp [--batches 8,32] [--output-len 96]

Every configuration runs eagerly (``--enforce-eager``: graphs are single-rank) and uses
both cores: one worker with 2 threads, or two workers with 1 thread each.
"""

from __future__ import annotations

import sys

import uvloop

from .common import base_parser, report, resolve_model, table, vocab_size
from .drive import deployment
from .w5_overhead import engine_steps

CONFIGS = [
    ("tp 1 (2 threads)", ["--tp", "1", "--threads-per-worker", "2"]),
    ("tp 2 (1 thread each)", ["--tp", "2", "--threads-per-worker", "1"]),
    ("tp 2 + micro-batch overlap", ["--tp", "2", "--threads-per-worker", "1", "--micro-batch-overlap"]),
]


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--batches", default="8,32", help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=96)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    model_dir = resolve_model(args.model)
    vocab = vocab_size(model_dir)
    results = {}
    for label, flags in CONFIGS:
        with deployment(model_dir, ["--enforce-eager", "--max-num-seqs", str(max(batches)), *flags], label) as dep:
            results[label] = uvloop.run(engine_steps(dep.address, batches, args.prompt_len, args.output_len,
                                                     vocab, args.seed))
    base = results[CONFIGS[0][0]]
    rows = [[label, b, results[label][b][0] * 1000, f"{base[b][0] / results[label][b][0]:.2f}×"]
            for label, _ in CONFIGS for b in batches]
    body = table(["configuration", "decode batch", "step ms", "speed vs tp 1"], rows)
    notes = [f"model {model_dir.name}; prompt {args.prompt_len}, {args.output_len} output tokens; step = wall time "
             "of the window where every request decodes / steps in it",
             "2 cores: tp 2 splits the same two cores between two processes, so it can show the cost of "
             "the collectives and whether overlap hides them, not a speed-up from more hardware"]
    report("W6 tensor parallelism: step time", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
