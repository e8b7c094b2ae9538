"""An instance measures its own service times at start: prefill time against prompt length
and decode step time against batch size and context, through the same ``StepPlan`` path
(and compiled decode graphs) that serves requests; the fitted laws (``xllm.perf_model``)
are published with its registration, and cached next to the compiled graphs so a restart
does not measure again.

Measuring runs before any request can arrive, on blocks no request holds yet; a decode
sample pretends its requests' context is already in the cache (attention reads whatever
the blocks hold: the time is what matters, not the tokens). Every rank runs the same plans,
so with tensor parallelism their collectives meet (each choice that depends on a time is
rank 0's, ``decide``). Plans use step id 0: the shared pool's
progress counter (``xllm.kv_transfer.pool``) must never run ahead of the scheduler's steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import msgspec
import torch

from ..config import CacheConfig, ModelConfig, SchedulerConfig
from ..models.loader import gguf_path
from ..perf_model import fit_profile
from ..protocol import InstanceProfile, NewRequestData, SamplingParams, StepPlan

log = logging.getLogger(__name__)

PROMPTS = (16, 32, 64, 128, 256, 512, 1024, 2048)  # prompt lengths tried
ALWAYS = 1024  # prompts up to this long are measured whatever the budget (the fit must not guess there)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
CONTEXTS = (16, 128, 512, 1024)  # per request
BUDGET_S = 6.0  # measuring stops growing the prompts and batches past this (the fit extrapolates)
REPEATS = 3  # of short samples; the median is kept
GREEDY = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)


class Profiler:
    """Times prefills and decode steps on one rank's runner (``ModelRunner``)."""

    def __init__(self, runner, sched: SchedulerConfig, cache: CacheConfig, max_model_len: int,
                 budget_s: float = BUDGET_S, decide=lambda flag: flag) -> None:
        self.runner = runner
        self.decide = decide  # a choice every rank makes alike: rank 0's flag
        self.chunk = sched.max_num_batched_tokens
        self.max_seqs = sched.max_num_seqs
        self.block_size = cache.block_size
        self.num_blocks = cache.num_blocks
        self.max_len = max_model_len
        self.budget_s = budget_s
        self._ids = 0

    def measure(self) -> InstanceProfile:
        t0 = time.perf_counter()
        self._prefill(16)  # first-call costs are not the model's
        prefill = self._prefill_samples(t0 + self.budget_s / 2)
        decode = self._decode_samples(time.perf_counter() + self.budget_s / 2)
        return fit_profile(prefill, decode, torch.get_num_threads(), time.perf_counter() - t0)

    def _prefill_samples(self, deadline: float) -> list[tuple[int, float]]:
        samples = []
        for n in PROMPTS:
            if n >= self.max_len or -(-n // self.block_size) > self.num_blocks:
                break
            took = self._timed(lambda: self._prefill(n))
            samples.append((n, took))
            # NOTE: the next length takes 2-4 times longer
            if n >= ALWAYS and self.decide(time.perf_counter() + 2.5 * took > deadline):
                break
        if len(samples) < 3:  # a fit needs three points: add shorter prompts
            samples += [(n, self._timed(lambda: self._prefill(n))) for n in (4, 8) if n < self.max_len]
        return samples

    def _decode_samples(self, deadline: float) -> list[tuple[int, int, float]]:
        samples = []
        for ctx in CONTEXTS:
            if ctx >= self.max_len:
                break
            for b in BATCHES:
                if b > self.max_seqs or b * -(-(ctx + 1) // self.block_size) > self.num_blocks:
                    break
                samples.append((b, b * ctx, self._timed(lambda: self._decode(b, ctx))))
                if self.decide(time.perf_counter() > deadline):
                    return samples
        return samples

    def _timed(self, run) -> float:
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
            if self.decide(times[-1] > 0.05):  # long samples vary little: one is enough
                break
        return statistics.median(times)

    def _plan(self, new: list[NewRequestData], ids: list[str], num_scheduled: list[int],
              num_computed: list[int], finished: list[str] = ()) -> None:
        self.runner.execute(StepPlan(0, new, {}, ids, num_scheduled, num_computed, list(finished)))

    def _request(self, tokens: int, first_block: int) -> NewRequestData:
        self._ids += 1
        blocks = list(range(first_block, first_block + -(-(tokens + 1) // self.block_size)))
        return NewRequestData(f"profile-{self._ids}", [1 + i % 100 for i in range(tokens)], blocks, GREEDY, tokens)

    def _prefill(self, n: int) -> None:
        """One prompt of ``n`` tokens, chunk by chunk as the scheduler plans it, alone."""
        req = self._request(n, 0)
        done = 0
        while done < n:
            step = min(self.chunk, n - done)
            self._plan([req] if done == 0 else [], [req.req_id], [step], [done])
            done += step
        self._plan([], [], [], [], [req.req_id])

    def _decode(self, batch: int, ctx: int) -> None:
        """One decode step of ``batch`` requests with ``ctx`` tokens of context each."""
        per = -(-(ctx + 1) // self.block_size)
        reqs = [self._request(ctx, k * per) for k in range(batch)]
        ids = [r.req_id for r in reqs]
        # NOTE: every request's first ctx - 1 tokens count as computed: one decode row each
        self._plan(reqs, ids, [1] * batch, [ctx - 1] * batch)
        self._plan([], [], [], [], ids)


def cache_key(model: ModelConfig, sched: SchedulerConfig, cache: CacheConfig, threads: int, tp_size: int,
              graphs: bool) -> str:
    """What the measured times depend on: the checkpoint, dtype, threads, the chunk and batch
    limits, compiled graphs or not, the torch build and the CPU."""
    path = Path(model.path)
    gguf = gguf_path(path)
    # a Hugging Face directory is its config; a GGUF checkpoint (file, or directory holding one) its file
    checkpoint = gguf if gguf is not None else path / "config.json"
    stat = checkpoint.stat()
    parts = [str(checkpoint.resolve()), str(stat.st_mtime_ns), str(stat.st_size),
             checkpoint.read_bytes().hex() if gguf is None else "", model.dtype, model.quantization,
             str(model.max_model_len), str(threads), str(tp_size),
             str(graphs), str(sched.max_num_batched_tokens), str(sched.max_num_seqs), str(cache.block_size),
             torch.__version__, platform.processor(), _cpu_model()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cache_dir() -> Path:
    """Beside the compiled graphs (``TORCHINDUCTOR_CACHE_DIR``)."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(Path.home() / ".cache" / "xllm" / "inductor")
    return Path(root) / "xllm-profiles"


def load_or_measure(profiler: Profiler, key: str, write: bool, agree=lambda cached: cached) -> InstanceProfile:
    """The cached profile for ``key``, else a new measurement (cached when ``write``).

    ``agree(cached)`` is True only if every rank of the instance has the cache: the ranks
    of one instance measure together or not at all (their plans meet in collectives).
    ``write`` (rank 0) also holds the host's lock meanwhile: instances of one host measure
    one at a time, so none times its steps while another takes the cores, and those with
    the same key find the first one's profile in the cache."""
    with _host_lock(write):
        return _load_or_measure(profiler, key, write, agree)


@contextlib.contextmanager
def _host_lock(take: bool):
    if not take:
        yield
        return
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # NOTE: released when the process ends, however it ends
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_or_measure(profiler: Profiler, key: str, write: bool, agree) -> InstanceProfile:
    path = cache_dir() / f"{key}.json"
    try:
        cached = msgspec.json.decode(path.read_bytes(), type=InstanceProfile)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        cached = None
    if agree(cached is not None):
        log.info("instance profile from %s", path)
        return msgspec.structs.replace(cached, seconds=0.0)
    prof = profiler.measure()
    log.info("instance profile measured in %.1f s: prefill %.3g + %.3g·L + %.3g·L² s (fit error %.1f%%, "
             "L <= %d); decode step %.3g + %.3g·B + %.3g·C s (fit error %.1f%%, B <= %d, C <= %d)",
             prof.seconds, *prof.prefill, 100 * prof.prefill_error, prof.max_prompt, *prof.decode,
             100 * prof.decode_error, prof.max_batch, prof.max_context)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(msgspec.json.encode(prof))
        tmp.replace(path)  # NOTE: atomic: instances starting together may measure and write at once
    return prof
