"""Linux network namespaces as hosts: each joined to this one by a veth pair on a bridge.

The "hosts" get addresses from the benchmarking range 198.18.0.0/15 on one /24 that this
module assigns and removes; this namespace (the bridge) is ``.1``. Needs root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from typing import Iterator

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def can_make_namespaces() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


@contextmanager
def hosts(names: list[str], subnet: str = "198.18.7") -> Iterator[dict[str, str]]:
    """Namespaces called ``names`` (short: veth names are built from them); yields name ->
    its address. ``f"{subnet}.1"`` is this namespace's address on the bridge."""
    why = can_make_namespaces()
    if why:
        pytest.fail(why)
    tag = f"{os.getpid() % 100000}"
    bridge = f"xb{tag}"
    made: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        addresses = {}
        for k, name in enumerate(names, start=2):
            ns, outer, inner = f"{name}{tag}", f"xo{k}-{tag}", f"xi{k}-{tag}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.{k}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            addresses[ns] = f"{subnet}.{k}"
        yield addresses
    finally:
        for ns in made:  # removing a namespace removes the veth ends in it, and so the pairs
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
