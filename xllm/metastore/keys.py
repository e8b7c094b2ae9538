"""Where xllm keeps what in the metadata store: the one place the key layout is written.

    /xllm/{deployment}/instances/{instance_id}   InstanceRecord (JSON), under the instance's lease
    /xllm/{deployment}/routers/{router_name}     RouterRecord (JSON), under the router's lease

``deployment`` names one deployment (``--deployment``, default "default"), so several
can share an etcd. Records are ``msgspec`` structs of ``xllm.protocol``; loads are not
here: they travel over the bus, twice a second, straight to the routers.

A lease lives ``LEASE_TTL_S`` seconds unless kept alive (every ``LEASE_TTL_S / 3``): an
instance or router that stops for longer disappears from the store.
"""

from __future__ import annotations

LEASE_TTL_S = 3


def deployment_prefix(deployment: str) -> bytes:
    return f"/xllm/{deployment}/".encode()


def instances_prefix(deployment: str) -> bytes:
    return deployment_prefix(deployment) + b"instances/"


def instance_key(deployment: str, instance_id: str) -> bytes:
    return instances_prefix(deployment) + instance_id.encode()


def routers_prefix(deployment: str) -> bytes:
    return deployment_prefix(deployment) + b"routers/"


def router_key(deployment: str, name: str) -> bytes:
    return routers_prefix(deployment) + name.encode()
