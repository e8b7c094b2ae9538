"""Helpers for deployments of several ``xllm-launch`` processes sharing a real etcd."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.deploy import Deployment, launch
from xllm.sdk import AsyncClient


def free_port_block(host: str = "127.0.0.1", span: int = 210) -> int:
    """A base port whose offsets the plan uses (0, 1, 100, 101, 200, 201) are free on ``host`` now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + span > 65535:
            continue
        try:
            for off in (0, 1, 100, 101, 200, 201):
                with socket.socket() as s:
                    s.bind((host, base + off))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


@contextmanager
def launch_role(model, tmp: Path, role: str, store_url: str, host: str, key_dir: Path | None,
                *args: str, base_port: int | None = None, netns: str = "") -> Iterator[Deployment]:
    """``xllm-launch --role ROLE`` advertising ``host``, logs in ``tmp``; inside the network
    namespace ``netns`` when given."""
    flags = ["--role", role, "--metastore", store_url, "--advertise-host", host,
             "--base-port", str(base_port or (7200 if netns else free_port_block(host)))]
    if key_dir is not None:
        flags += ["--cluster-key-dir", str(key_dir)]
    wrapper = ("ip", "netns", "exec", netns) if netns else ()
    with launch(model, tmp, *flags, *args, wrapper=wrapper) as dep:
        yield dep


async def wait_instances(address: str, n: int, timeout: float = 120.0, key_dir: str = "") -> dict:
    """Poll the router's stats until it counts ``n`` instances; the stats."""
    deadline = time.monotonic() + timeout  # a bound, not a measurement
    async with AsyncClient(address, key_dir) as c:
        while True:
            stats = await c.call("stats")
            if stats["router"]["num_instances"] == n:
                return stats
            assert time.monotonic() < deadline, f"the router counts {stats['router']['num_instances']} " \
                                                f"instances, not {n}, after {timeout} s"
            await asyncio.sleep(0.1)
