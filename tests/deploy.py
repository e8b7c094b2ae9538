"""Test helpers around ``xllm.deploy.harness``: start deployments, check nothing is left."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

from xllm.deploy.harness import Deployment
from xllm.deploy.harness import launch as launch_deployment

__all__ = ["Deployment", "launch", "wait_gone"]


@contextmanager
def launch(model, tmp: Path, *args: str, graphs: bool = False, **kw) -> Iterator[Deployment]:
    """``xllm.deploy.harness.launch`` with compiled decode graphs off unless ``graphs`` (compiling
    takes seconds per batch bucket; one test covers graph mode)."""
    flags = args if graphs else ("--enforce-eager", *args)
    with launch_deployment(model, tmp, *flags, **kw) as dep:
        yield dep


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Pids still running (not zombies) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in pids:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)
