"""The metadata store: instance registration under leases, the service's own keys."""

from .base import MetaStore, StoreUnavailable, WatchEvent, open_store

__all__ = ["MetaStore", "StoreUnavailable", "WatchEvent", "open_store"]
