"""Tensor parallelism on this machine: decode step time with --tp 1, --tp 2, and --tp 2
with micro-batch overlap, side by side in one run.

    python -m bench.w6_tp [--batches 8,32] [--output-len 96]

Every configuration runs eagerly (``--enforce-eager``: graphs are single-rank) and uses
both cores: one worker with 2 threads, or two workers with 1 thread each.
"""

from __future__ import annotations

import sys

import uvloop

import torch

from xllm.config import read_hf_config

from . import collectives
from .bare_forward import time_decode
from .collectives import bare_tp_steps, step_collective_ms
from .common import base_parser, report, resolve_model, table, vocab_size
from .drive import deployment
from .w5_overhead import engine_steps

CONFIGS = [
    ("tp 1 (2 threads)", ["--tp", "1", "--threads-per-worker", "2"]),
    ("tp 2 (1 thread each)", ["--tp", "2", "--threads-per-worker", "1"]),
    ("tp 2, gloo collectives", ["--tp", "2", "--threads-per-worker", "1", "--no-shm-collectives"]),
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
    # the same steps without the engine: the runner alone, in this process (tp 1) and in
    # two bare ranks (tp 2), then the collectives alone
    torch.set_num_threads(2)
    bare1 = {b: time_decode(model_dir, b, args.prompt_len + args.output_len // 2, graphs=False)["runner"]
             for b in batches}
    bare2 = bare_tp_steps(model_dir, batches, args.prompt_len + args.output_len // 2)
    hf = read_hf_config(model_dir)
    comm = collectives.measure(batches, hf["hidden_size"], hf["vocab_size"])
    layers = hf["num_hidden_layers"]
    base = results[CONFIGS[0][0]]
    bare = {CONFIGS[0][0]: {b: bare1[b] * 1000 for b in batches},
            CONFIGS[1][0]: {b: bare2[(b, False)] * 1000 for b in batches},
            CONFIGS[2][0]: {b: "-" for b in batches},
            CONFIGS[3][0]: {b: bare2[(b, True)] * 1000 for b in batches}}

    def comm_ms(label: str, b: int):
        if "tp 2" not in label:
            return "-"
        return step_collective_ms(comm[b], layers, shm="gloo" not in label)

    rows = [[label, b, results[label][b][0] * 1000, f"{base[b][0] / results[label][b][0]:.2f}×",
             bare[label][b], comm_ms(label, b)] for label, _ in CONFIGS for b in batches]
    body = table(["configuration", "decode batch", "engine step ms", "speed vs tp 1", "runner alone ms",
                  "collectives alone ms"], rows)
    notes = [f"model {model_dir.name}; prompt {args.prompt_len}, {args.output_len} output tokens; step = wall time "
             "of the window where every request decodes / steps in it",
             "runner alone = ModelRunner.execute of the same decode step with nothing else running (tp 2: two "
             "bare ranks of one thread, shared-memory collectives); collectives alone = the 1 + 2 × layers "
             "all-reduces, the logits all-gather and the token broadcast of one step, timed in two bare "
             "processes (shared memory by default; gloo for the gloo row)",
             "2 cores: tp 2 splits the same two cores between two processes, so it can show the cost of "
             "the collectives and whether overlap hides them, not a speed-up from more hardware"]
    report("W6 tensor parallelism: step time", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
