"""Start a deployment in a subprocess, the way a user does, and wait until it serves.

Used by ``xllm.demo``, the benchmarks and the tests: one code path for all of them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .entry import die_with_parent


class Deployment:
    """A running ``xllm-launch`` process; ``address`` is where the SDK connects."""

    def __init__(self, proc: subprocess.Popen, address: str, info: dict, log: Path) -> None:
        self.proc = proc
        self.address = address
        self.pids: dict[str, int] = info["pids"]
        self.info = info
        self.log = log

    def output(self) -> str:
        """Everything the launcher and its actors printed so far."""
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Signal the launcher and wait for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextmanager
def launch(model: str | Path, run_dir: Path, *args: str, timeout: float = 600.0,
           echo: bool = False, wrapper: tuple[str, ...] = ()) -> Iterator[Deployment]:
    """Run ``xllm-launch --model MODEL ARGS`` until ready; stop it (SIGINT) on exit.

    ``wrapper`` runs the launcher through a command that execs it (for example
    ``("ip", "netns", "exec", "A")`` to put it in a network namespace).

    The deployment listens on ``ipc://RUN_DIR/frontend.sock``; its output goes to
    ``RUN_DIR/launch.log`` (and to this process's stderr too with ``echo``).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    address = f"ipc://{run_dir}/frontend.sock"
    ready = run_dir / "ready.json"
    ready.unlink(missing_ok=True)
    log = run_dir / "launch.log"
    cmd = [*wrapper, sys.executable, "-m", "xllm.deploy.launcher", "--model", str(model), "--address", address,
           "--ready-file", str(ready), *args]
    out = open(log, "wb")
    # NOTE: the launcher follows this process if it dies (a test runner killed outright)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    out.close()
    shown = 0
    deadline = time.monotonic() + timeout
    try:
        while not ready.exists():
            if echo:
                text = log.read_bytes()
                sys.stderr.write(text[shown:].decode(errors="replace"))
                shown = len(text)
            if proc.poll() is not None:
                raise RuntimeError(f"xllm-launch exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"xllm-launch not ready after {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        time.sleep(0.05)  # the file is written; let the writer close it
        if echo:
            sys.stderr.write(log.read_bytes()[shown:].decode(errors="replace"))
        dep = Deployment(proc, address, json.loads(ready.read_text()), log)
        yield dep
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
