"""Start-up time: a cold start (empty compile cache) against restarts with a warm one.

    python -m bench.startup [--restarts 2]

Each start runs ``xllm-launch`` until it reports ready (weights loaded, KV cache
allocated, every decode graph compiled and warmed up). The cold start points inductor's
cache (``TORCHINDUCTOR_CACHE_DIR``) at a new empty directory; the restarts reuse it, as
a restart of a deployment reuses ``~/.cache/xllm/inductor``. An ``--enforce-eager`` start
(no graphs) is the floor. The C++ kernel is already built in every run (its own cache).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from xllm.deploy.harness import launch

from .common import base_parser, report, resolve_model, table


def time_to_ready(model_dir: Path, args: list[str], cache_dir: str) -> float:
    """Seconds from starting ``xllm-launch`` to its ready file, with the given cache."""
    run_dir = Path(tempfile.mkdtemp(prefix="xllm-bench-"))
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    try:
        t0 = time.perf_counter()
        with launch(model_dir, run_dir, *args):
            return time.perf_counter() - t0
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--restarts", type=int, default=2, help="warm restarts after the cold start")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sets the decode graph buckets")
    args = p.parse_args(argv)
    model_dir = resolve_model(args.model)
    flags = ["--max-num-seqs", str(args.max_num_seqs)]
    cache = tempfile.mkdtemp(prefix="xllm-inductor-")
    rows = []
    try:
        cold = time_to_ready(model_dir, flags, cache)
        print(f"cold start: {cold:.1f} s", flush=True)
        rows.append(["cold (empty compile cache)", cold, "1.00×"])
        for i in range(args.restarts):
            warm = time_to_ready(model_dir, flags, cache)
            print(f"warm restart {i + 1}: {warm:.1f} s", flush=True)
            rows.append([f"warm restart {i + 1}", warm, f"{cold / warm:.2f}×"])
        eager = time_to_ready(model_dir, [*flags, "--enforce-eager"], cache)
        rows.append(["--enforce-eager (no graphs)", eager, f"{cold / eager:.2f}×"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    body = table(["start", "seconds to ready", "faster than cold"], rows)
    notes = [f"model {model_dir.name}; xllm-launch {' '.join(flags)}: decode graphs for the default buckets; "
             "seconds from process start to the ready file, measured by the caller",
             "cold = a new empty TORCHINDUCTOR_CACHE_DIR; warm = the same directory again"]
    report("Start-up: cold against warm compile cache", body, args, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
