"""A real etcd for tests: started on loopback with a temporary data dir, stopped by PID."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member on 127.0.0.1 (or ``host``); ``url`` is its xllm store URL."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.data_dir, self.host = data_dir, host
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.client_port}"

    def start(self, timeout: float = 30.0) -> None:
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.data_dir), "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout  # a bound on start-up, not a measurement
        while subprocess.run(["etcdctl", "--endpoints", client, "endpoint", "health"],
                             capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def wipe(self) -> None:
        """Forget everything (the next start is a new, empty cluster)."""
        shutil.rmtree(self.data_dir, ignore_errors=True)


@contextmanager
def running_etcd(tmp: Path, host: str = "127.0.0.1") -> Iterator[Etcd]:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed (scripts/setup.sh installs Debian's etcd-server)")
    etcd = Etcd(tmp / "etcd-data", host)
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.stop()
