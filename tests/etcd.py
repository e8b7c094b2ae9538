"""A real etcd for tests: started on loopback with a temporary data dir, stopped by PID;
over TLS, with certificates the test makes, when asked."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a CA made for one test and of two certificates it signed: etcd's (for
    127.0.0.1) and a client's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A new CA in ``directory`` (each call a different one), etcd's certificate with
    127.0.0.1 as an IP SAN, and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-days", "1", *_NEW_KEY, ca_key, "-out", ca, "-subj", "/CN=xllm test CA")
    server = _signed(directory / "server", ca, ca_key, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    client = _signed(directory / "client", ca, ca_key, "extendedKeyUsage=clientAuth")
    return TlsFiles(ca, *server, *client)


_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout")


def _signed(stem: Path, ca: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
    """A certificate and its key at ``stem``.pem and ``stem``.key, signed by ``ca``."""
    cert, key, request, ext = (stem.with_suffix(s) for s in (".pem", ".key", ".csr", ".ext"))
    ext.write_text(extensions + "\n")
    _openssl("req", *_NEW_KEY, key, "-out", request, "-subj", f"/CN=xllm test {stem.name}")
    _openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-days", "1", "-extfile", ext, "-out", cert)
    return cert, key


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr}")


class Etcd:
    """One etcd member on 127.0.0.1 (or ``host``); ``url`` is its xllm store URL.

    With ``tls`` it serves clients over TLS only, with ``tls``'s server certificate, and
    (``client_cert_auth``) admits only clients with a certificate its CA signed.
    """

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", tls: TlsFiles | None = None,
                 client_cert_auth: bool = True) -> None:
        self.data_dir, self.host, self.tls = data_dir, host, tls
        self.client_cert_auth = client_cert_auth
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        """``etcdctl ARGS`` against this member (with the client certificate over TLS)."""
        tls = ("--cacert", str(self.tls.ca), "--cert", str(self.tls.client_cert),
               "--key", str(self.tls.client_key)) if self.tls else ()
        return subprocess.run(["etcdctl", "--endpoints", self.client_url, *tls, *args], capture_output=True)

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        flags = ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key)]
        # NOTE: etcd 3.4 asks every client for a certificate once it has a --trusted-ca-file
        check = ["--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
        return flags + check if self.client_cert_auth else flags

    def start(self, timeout: float = 30.0) -> None:
        client = self.client_url
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.data_dir), "--listen-client-urls", client,
             "--advertise-client-urls", client, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}", *self._tls_flags()],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout  # a bound on start-up, not a measurement
        while self.ctl("endpoint", "health").returncode != 0:
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
def running_etcd(tmp: Path, host: str = "127.0.0.1", tls: TlsFiles | None = None,
                 client_cert_auth: bool = True) -> Iterator[Etcd]:
    """An ``Etcd`` started with its data in ``tmp``, stopped (by PID) on exit."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed (scripts/setup.sh installs Debian's etcd-server)")
    etcd = Etcd(tmp / "etcd-data", host, tls, client_cert_auth)
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.stop()
