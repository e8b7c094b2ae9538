"""Instance profiles: the least-squares fit of the service-time laws, the predictions made
from them, and the measurement on a real model runner (with its cache)."""

from __future__ import annotations

import numpy as np
import pytest

from xllm.config import CacheConfig, ModelConfig, SchedulerConfig, read_hf_config
from xllm.perf_model import ServiceModel, decode_design, fit_nonnegative, fit_profile, prefill_design
from xllm.protocol import InstanceProfile


def test_the_fit_recovers_the_laws_it_is_given():
    lengths = [16, 64, 256, 1024, 2048]
    pre = [0.002 + 1e-4 * n + 2e-8 * n * n for n in lengths]
    batches, contexts = [1, 4, 16, 1, 4, 16], [100, 400, 1600, 2000, 8000, 32000]
    dec = [0.01 + 5e-4 * b + 1e-6 * c for b, c in zip(batches, contexts)]
    prof = fit_profile(list(zip(lengths, pre)), list(zip(batches, contexts, dec)), threads=2)
    assert np.allclose(prof.prefill, (0.002, 1e-4, 2e-8), rtol=1e-6)
    assert np.allclose(prof.decode, (0.01, 5e-4, 1e-6), rtol=1e-6)
    assert prof.prefill_error < 1e-9 and prof.decode_error < 1e-9
    assert (prof.max_prompt, prof.max_batch, prof.max_context, prof.threads) == (2048, 16, 32000, 2)


def test_a_coefficient_least_squares_would_make_negative_is_held_at_zero():
    lengths = np.array([16, 64, 256, 1024])
    seconds = 0.001 + 1e-4 * lengths
    seconds[-1] *= 0.97  # the longest prompt ran a little fast: plain least squares bends down (p2 < 0)
    plain, *_ = np.linalg.lstsq(prefill_design(lengths) / seconds[:, None], np.ones(4), rcond=None)
    assert plain[2] < 0
    coef, error = fit_nonnegative(prefill_design(lengths), seconds)
    assert coef[2] == 0.0 and np.all(coef >= 0) and error < 0.03


def test_a_fit_refuses_samples_of_no_duration():
    with pytest.raises(ValueError, match="positive duration"):
        fit_nonnegative(decode_design([1, 2], [10, 20]), np.array([0.01, 0.0]))


def test_predictions_count_cached_tokens_and_empty_batches():
    model = ServiceModel(InstanceProfile((0.01, 1e-3, 1e-6), (0.02, 1e-3, 1e-5)))
    assert model.prefill_s(100) == pytest.approx(0.01 + 0.1 + 0.01)
    assert model.prefill_s(100, cached=60) == pytest.approx(0.01 + 0.04 + 1e-6 * (100**2 - 60**2))
    assert model.prefill_s(100, cached=100) == 0.0
    assert model.decode_step_s(0, 0) == 0.0
    assert model.decode_step_s(4, 1000) == pytest.approx(0.02 + 0.004 + 0.01)


def test_a_real_runner_measures_its_profile_once_and_reads_it_back(make_tiny, tmp_path, monkeypatch):
    from xllm.worker.model_runner import ModelRunner
    from xllm.worker.profiler import Profiler, cache_key, load_or_measure

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    path = make_tiny("tiny-llama")
    model, cache = ModelConfig(str(path), max_model_len=512), CacheConfig(block_size=16, num_blocks=128)
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128)
    runner = ModelRunner(model, cache, read_hf_config(path))
    key = cache_key(model, sched, cache, threads=1, tp_size=1, graphs=False)
    profiler = Profiler(runner, sched, cache, model.max_model_len, budget_s=600.0)  # a bound: never reached
    first = load_or_measure(profiler, key, write=True)
    # every prompt length below the context, every batch up to max_num_seqs, contexts below it
    assert (first.max_prompt, first.max_batch, first.max_context) == (256, 8, 8 * 128)
    assert all(c >= 0 for c in (*first.prefill, *first.decode)) and first.seconds > 0
    assert np.isfinite(first.prefill_error) and np.isfinite(first.decode_error)
    again = load_or_measure(profiler, key, write=True)
    assert again.seconds == 0.0 and again.prefill == first.prefill  # from the cache
    assert not runner.requests  # measuring left no request behind
    other = cache_key(model, SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=128), cache, 1, 1, False)
    assert other != key  # other limits, another profile


def test_with_no_time_to_spare_the_prompts_serving_sees_most_are_still_measured(make_tiny, tmp_path, monkeypatch):
    from xllm.worker.model_runner import ModelRunner
    from xllm.worker.profiler import Profiler, cache_key, load_or_measure

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    path = make_tiny("tiny-llama")
    model, cache = ModelConfig(str(path), max_model_len=512), CacheConfig(block_size=16, num_blocks=128)
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128)
    runner = ModelRunner(model, cache, read_hf_config(path))
    key = cache_key(model, sched, cache, threads=1, tp_size=1, graphs=False)
    prof = load_or_measure(Profiler(runner, sched, cache, model.max_model_len, budget_s=0.0), key, write=True)
    assert prof.max_prompt == 256  # every length below the context, though the budget is spent at once
    assert prof.max_batch == 1  # batches are cut by the budget


def test_a_gguf_checkpoint_has_a_profile_key(tmp_path):
    """A GGUF model (a file, or a directory holding one and no config.json) is keyed by its file:
    starting an instance on one must not fail for want of a config.json."""
    from xllm.worker.profiler import cache_key

    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    sched, cache = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128), CacheConfig(block_size=16)
    by_dir = cache_key(ModelConfig(str(folder)), sched, cache, 1, 1, True)
    assert by_dir == cache_key(ModelConfig(str(folder / "model.gguf")), sched, cache, 1, 1, True)
    assert by_dir != cache_key(ModelConfig(str(folder), quantization="q8_0"), sched, cache, 1, 1, True)
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(80))  # another checkpoint in its place
    assert by_dir != cache_key(ModelConfig(str(folder)), sched, cache, 1, 1, True)
