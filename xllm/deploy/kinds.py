"""The actor kinds: one row per kind, from the name in a plan to the class that runs it.

Classes are imported only in the process that runs them (a worker imports torch, a
frontend does not), so rows name them as ``module:Class``.
"""

from __future__ import annotations

import importlib

KINDS = {
    "store": "xllm.metastore.server:StoreActor",
    "frontend": "xllm.frontend.actor:FrontendActor",
    "router": "xllm.router.actor:RouterActor",
    "scheduler": "xllm.scheduler.actor:SchedulerActor",
    "worker": "xllm.worker.actor:WorkerActor",
    "kv_agent": "xllm.kv_transfer.agent:KVAgentActor",
    "http": "xllm.http.actor:HttpActor",
}


def actor_class(kind: str) -> type:
    """The class of actor ``kind``; ``KeyError`` for a kind there is no row for."""
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)
