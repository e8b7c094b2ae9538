"""One answer to a control call from the answers of every instance.

The router asks each instance; this turns their replies (or their silence) into the
single ``ControlReply`` the caller gets. With one instance the answer is that
instance's own (plus the instance count), so a deployment of one reads as before.
"""

from __future__ import annotations

from typing import Any

from ..protocol import ControlReply

FANNED_OUT = ("stats", "health", "reset_prefix_cache", "check_integrity")


def merge(call_id: int, method: str, replies: dict[str, ControlReply | None]) -> ControlReply:
    """``replies``: instance id -> its reply, None where it did not answer in time."""
    ok = {i: r.result for i, r in replies.items() if r is not None and r.ok}
    failed = {i: (r.error if r is not None else "no answer in time") for i, r in replies.items()
              if r is None or not r.ok}
    if method == "health":
        if ok or not replies:
            return ControlReply(call_id, bool(ok), {"instances": len(replies), "healthy": len(ok)},
                                None if ok else "unavailable: no instance is registered")
        first = next(iter(failed.values()))
        return ControlReply(call_id, False, error=first if len(failed) == 1 else
                            f"unavailable: no instance can take a step ({len(failed)} registered)")
    if method == "stats":  # what there is: a deployment with no instance still has stats
        return ControlReply(call_id, True, _merge_stats(ok))
    if not ok:
        reason = "; ".join(f"{i}: {e}" for i, e in failed.items()) or "no instance is registered"
        return ControlReply(call_id, False, error=reason)
    if method == "drain":  # asked of one instance: its answer
        return ControlReply(call_id, True, next(iter(ok.values())))
    if method == "check_integrity":
        return ControlReply(call_id, True, _sum(ok.values()))
    if method == "reset_prefix_cache":
        return ControlReply(call_id, True, all(ok.values()) and not failed)
    return ControlReply(call_id, False, error=f"unknown method {method!r}")


def _sum(results) -> dict[str, Any]:
    """Numbers summed; lists of numbers (per-position counts) summed element by element."""
    out: dict[str, Any] = {}
    for r in results:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                acc = out.setdefault(k, [])
                acc.extend([0] * (len(v) - len(acc)))
                for i, x in enumerate(v):
                    acc[i] += x
    return out


def _merge_stats(ok: dict[str, dict]) -> dict[str, Any]:
    """Counts summed; usage and hit rate recomputed from the sums; each instance's own too."""
    total = _sum(ok.values())
    blocks = total.get("num_blocks", 0)
    total["kv_usage"] = (blocks - total.get("num_free_blocks", 0)) / blocks if blocks else 0.0
    queries = total.get("prefix_cache_queries", 0)
    total["prefix_cache_hit_rate"] = total.get("prefix_cache_hits", 0) / queries if queries else 0.0
    total["num_instances"] = len(ok)
    total["instances"] = ok
    return total
