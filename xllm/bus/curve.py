"""ZeroMQ CURVE for the sockets that cross hosts: encrypted, and only for key holders.

A cluster has one key pair, made once (``xllm-launch --make-cluster-key DIR``) and given
to every host and client as ``--cluster-key-dir DIR``. Every tcp socket of the
deployment is then a CURVE server or client with that pair, and each process that
binds one runs a ZAP authenticator that admits only clients presenting the cluster's
public key: a peer without the secret key cannot complete the handshake, so it can send
nothing. ``ipc://`` sockets stay plain (a directory only this user can enter).
"""

from __future__ import annotations

from pathlib import Path

import zmq

NAME = "cluster"


def make_keys(key_dir: str | Path) -> Path:
    """Write a new cluster key pair into ``key_dir``; returns the public key file."""
    import zmq.auth

    d = Path(key_dir)
    d.mkdir(parents=True, exist_ok=True)
    public, _secret = zmq.auth.create_certificates(str(d), NAME)
    return Path(public)


def _pair(key_dir: str) -> tuple[bytes, bytes]:
    import zmq.auth

    public, secret = zmq.auth.load_certificate(str(Path(key_dir) / f"{NAME}.key_secret"))
    if secret is None:
        raise ValueError(f"{key_dir} holds no {NAME}.key_secret (make one with --make-cluster-key)")
    return public, secret


def options(address: str, key_dir: str, *, server: bool) -> dict[int, object]:
    """Socket options for ``address``: CURVE for tcp when there is a key, else none."""
    if not key_dir or not address.startswith("tcp://"):
        return {}
    public, secret = _pair(key_dir)
    opts: dict[int, object] = {zmq.CURVE_PUBLICKEY: public, zmq.CURVE_SECRETKEY: secret}
    if server:
        opts[zmq.CURVE_SERVER] = 1
    else:
        opts[zmq.CURVE_SERVERKEY] = public
    return opts


def server_options(key_dir: str, address: str = "tcp://") -> dict[int, object]:
    return options(address, key_dir, server=True)


def start_authenticator(ctx: zmq.asyncio.Context, key_dir: str):
    """Admit only clients with the cluster's public key on ``ctx``'s CURVE server sockets."""
    from zmq.auth.asyncio import AsyncioAuthenticator

    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(key_dir))
    return auth
