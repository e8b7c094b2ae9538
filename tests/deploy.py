"""Test helpers around ``xllm.deployment``: start deployments, check nothing is left."""

from __future__ import annotations

import time

import psutil

from xllm.deployment import Deployment, launch

__all__ = ["Deployment", "launch", "wait_gone"]


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
