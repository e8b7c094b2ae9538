"""The metadata store: instance registration under leases, the service's own keys."""

from .base import MetaStore, StoreUnavailable, WatchEvent, etcd_access, open_store

__all__ = ["MetaStore", "StoreUnavailable", "WatchEvent", "etcd_access", "open_store"]
