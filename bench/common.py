"""What every benchmark shares: seeded workloads, the metric math, tables and RESULTS.md.

Metric definitions follow ``vllm bench serve`` (see the workloads in the project's BENCHMARKS.md):
TTFT is send → first token; TPOT is (E2EL − TTFT) / (output tokens − 1); ITL is every
gap between streamed chunks, pooled over all requests; E2EL is send → last token.
Goodput counts the requests that meet every SLO given, per second of the run.

Nothing here starts processes or measures time; ``bench.drive`` does that.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
SLO_KEYS = ("ttft", "tpot", "e2el")


# -- workloads --------------------------------------------------------------------------
@dataclass
class BenchRequest:
    """One request of a workload: prompt token ids and how many tokens to generate."""

    prompt: list[int]
    max_tokens: int


def _token_range(vocab_size: int) -> tuple[int, int]:
    """Ordinary token ids: stay clear of the special ids at both ends of the vocabulary."""
    margin = min(100, vocab_size // 10)
    return margin, vocab_size - margin


def random_prompt(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    """``n`` random ordinary token ids."""
    lo, hi = _token_range(vocab_size)
    return [rng.randrange(lo, hi) for _ in range(n)]


def offline_requests(n: int, vocab_size: int, seed: int = 0, prompt_len: tuple[int, int] = (64, 512),
                     output_len: tuple[int, int] = (32, 256)) -> list[BenchRequest]:
    """W1: ``n`` requests, prompt and output lengths uniform in the (inclusive) ranges."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(*prompt_len)
        o = rng.randint(*output_len)
        out.append(BenchRequest(random_prompt(rng, p, vocab_size), o))
    return out


def shared_prefix_requests(n: int, vocab_size: int, prefix_len: int = 1024, unique_len: int = 32,
                           output_len: int = 32, seed: int = 0) -> list[BenchRequest]:
    """W4: ``n`` requests of one shared prefix followed by ``unique_len`` tokens of their own."""
    rng = random.Random(seed)
    prefix = random_prompt(rng, prefix_len, vocab_size)
    return [BenchRequest(prefix + random_prompt(rng, unique_len, vocab_size), output_len) for _ in range(n)]


def poisson_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``n`` Poisson arrivals at ``rate`` per second."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# -- one request's timeline -------------------------------------------------------------
@dataclass
class RequestRecord:
    """The client's view of one request: when it was sent and when each chunk came."""

    prompt_len: int
    start: float  # send time (any monotonic clock, seconds)
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk with output
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each chunk
    error: str = ""  # non-empty when the request failed

    def add(self, t: float, tokens: int) -> None:
        """Record a chunk of ``tokens`` output tokens arriving at ``t``."""
        self.chunk_times.append(t)
        self.chunk_tokens.append(tokens)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        """(E2EL − TTFT) / (output tokens − 1); None for a single-token output."""
        n = self.output_tokens
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive chunks."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


# -- statistics -------------------------------------------------------------------------
def stats(values: list[float]) -> dict[str, float]:
    """Mean, median and p99 (linear interpolation, like numpy); NaN for no values."""
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p99": float(np.percentile(a, 99))}


def parse_slos(text: str) -> dict[str, float]:
    """``"ttft:2000,tpot:100"`` (milliseconds) -> ``{"ttft": 2.0, "tpot": 0.1}`` (seconds)."""
    slos: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition(":")
        if key not in SLO_KEYS or not value:
            raise ValueError(f"bad SLO {part!r}: use KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        slos[key] = float(value) / 1000.0
    return slos


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """True if the request finished and met every SLO (a 1-token output has TPOT 0)."""
    if not rec.ok:
        return False
    got = {"ttft": rec.ttft, "tpot": rec.tpot or 0.0, "e2el": rec.e2el}
    return all(got[k] <= limit for k, limit in slos.items())


def summarize(records: list[RequestRecord], duration: float, slos: dict[str, float] | None = None) -> dict:
    """Throughput, latency statistics (seconds) and goodput of one run of ``duration`` seconds."""
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    good = sum(meets_slos(r, slos) for r in records) if slos else len(done)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration": duration,
        "input_tokens": sum(r.prompt_len for r in done),
        "output_tokens": out_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "good_requests": good,
        "goodput": good / duration,
        "good_fraction": good / len(records) if records else 0.0,
        "ttft": stats([r.ttft for r in done]),
        "tpot": stats([t for r in done if (t := r.tpot) is not None]),
        "itl": stats([g for r in done for g in r.itls]),
        "e2el": stats([r.e2el for r in done]),
    }


# -- reporting --------------------------------------------------------------------------
def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats get three significant decimals at most."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """CPU model, core count, memory, library versions and the git revision."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    import torch
    import transformers

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=BENCH_DIR).stdout.strip() or "?"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=BENCH_DIR).stdout.strip()
    load = os.getloadavg()[0]  # other users of the machine show up here
    return (f"{cpu}, nproc {os.cpu_count()}{mem}; load average {load:.1f} at the end; torch "
            f"{torch.__version__}, transformers {transformers.__version__}, Python "
            f"{platform.python_version()}; xllm git {rev}" + (" + uncommitted changes" if dirty else ""))


def command_line() -> str:
    """The command that is running, as a user would type it."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None else f"python {sys.argv[0]}"
    return head + "".join(f" '{a}'" if " " in a or not a else f" {a}" for a in sys.argv[1:])


def report(title: str, body: str, args: argparse.Namespace, notes: list[str] = ()) -> None:
    """Print ``body`` and, unless ``--no-record``, append a dated section to RESULTS.md."""
    print(f"\n{title}\n\n{body}\n")
    for n in notes:
        print(f"- {n}")
    if args.no_record:
        return
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = (f"\n## {title} ({now})\n\n- machine: {machine()}\n- command: `{command_line()}`\n"
            + "".join(f"- {n}\n" for n in notes) + f"\n{body}\n")
    path = Path(args.results)
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by the commands in `bench/` "
                        "(the workloads are defined in the project's BENCHMARKS.md).\n")
    with open(path, "a") as f:
        f.write(text)
    print(f"(appended to {path})")


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every benchmark takes: the model, the seed and where results go."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="preset:llama-110m", help="model directory or preset:NAME")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload")
    p.add_argument("--results", default=str(RESULTS), help="the markdown file sections are appended to")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to the results")
    return p


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """``--launch-args``: extra ``xllm-launch`` flags, passed through as one string."""
    p.add_argument("--launch-args", default="",
                   help="extra xllm-launch flags as one string; write --launch-args='--flag value'")


def resolve_model(model: str) -> Path:
    """A model directory from a path or ``preset:NAME`` (made and cached on first use)."""
    if model.startswith("preset:"):
        from xllm_tools import ensure_model

        return ensure_model(model.removeprefix("preset:"))
    return Path(model)


def vocab_size(model_dir: Path) -> int:
    """The checkpoint's vocabulary size."""
    from xllm.config import read_hf_config

    return int(read_hf_config(model_dir)["vocab_size"])
