"""Killing the launcher (or whoever started it) at any time leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.deploy import wait_gone
from xllm.deploy.launcher import RUN_DIR_PREFIX


def _run_dirs(launcher_pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}{launcher_pid}-*"))


def _wait_for(predicate, what: str, limit_s: float = 300.0) -> None:
    deadline = time.monotonic() + limit_s  # a bound on the test, not a measurement
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_launcher_killed_during_warm_up_leaves_no_process_and_no_run_dir(make_tiny, tmp_path):
    log = tmp_path / "launch.log"
    # a cold compile cache: the worker spends many seconds compiling decode graphs
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "xllm.deploy.launcher", "--model", str(make_tiny("tiny-llama")),
                                 "--address", f"ipc://{tmp_path}/sdk.sock"], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(lambda: "compiling decode graphs" in log.read_text(errors="replace"), "the warm-up")
        actors = [p.pid for p in psutil.Process(proc.pid).children()]
        assert len(actors) >= 3 and _run_dirs(proc.pid)  # every actor has started
        proc.kill()
        proc.wait()
        # NOTE: without the fix the worker keeps compiling until its warm-up ends
        assert wait_gone(actors, timeout=10) == []
        left = _run_dirs(proc.pid)
        assert left == [], log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


HARNESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from xllm.deploy.harness import launch
    with launch(sys.argv[1], Path(sys.argv[2]), "--enforce-eager") as dep:
        print(dep.proc.pid, *dep.pids.values(), flush=True)
        time.sleep(600)
""")


def test_killed_harness_takes_its_deployment_along(make_tiny, tmp_path):
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    harness = subprocess.Popen([sys.executable, str(script), str(make_tiny("tiny-llama")), str(tmp_path / "run")],
                               stdout=subprocess.PIPE, text=True)
    try:
        launcher, *actors = map(int, harness.stdout.readline().split())
        assert _run_dirs(launcher)
        harness.kill()  # the test runner itself, killed outright
        harness.wait()
        assert wait_gone([launcher, *actors]) == []
        assert _run_dirs(launcher) == []
    finally:
        if harness.poll() is None:
            harness.kill()
