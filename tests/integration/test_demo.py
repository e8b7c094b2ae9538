"""The README's run command shows its progress while the deployment starts."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_shows_start_up_progress_and_answers(make_tiny):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "xllm.demo", "--model", str(make_tiny("tiny-llama")),
                          "--requests", "2", "--max-tokens", "4", "--", "--enforce-eager"],
                         capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # NOTE: the launcher's progress goes to stderr while it starts, before the demo's "ready:"
    assert "worker-0 ready" in out.stderr and "frontend ready" in out.stderr
    assert "2 requests" in out.stdout and "deployment stopped (launcher exit code 0)" in out.stdout
