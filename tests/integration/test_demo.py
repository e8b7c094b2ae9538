"""The README's run command shows its progress while the deployment starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_demo_shows_start_up_progress_and_answers(make_tiny):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "xllm.demo", "--model", str(make_tiny("tiny-llama")),
                          "--requests", "2", "--max-tokens", "4", "--", "--enforce-eager"],
                         capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # NOTE: the launcher's progress goes to stderr while it starts, before the demo's "ready:"
    assert "worker-0 ready" in out.stderr and "frontend ready" in out.stderr
    assert "2 requests" in out.stdout and "deployment stopped (launcher exit code 0)" in out.stdout


@pytest.mark.slow
def test_demo_answers_from_the_real_model_by_default(smollm2):
    """The README's run command with its default model: a real answer, not random text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "xllm.demo", "--requests", "4", "--max-tokens", "16",
                          "--", "--enforce-eager"],
                         capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "model smollm2-135m-instruct" in out.stdout
    first = out.stdout.split("What is the capital of France? Answer in one sentence.\n", 1)[1].splitlines()[0]
    assert "Paris" in first
