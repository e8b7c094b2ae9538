"""Prometheus metrics of the HTTP shim, in the ``xllm:`` namespace, in a private registry.

Request metrics count SDK requests (one per choice, so ``n=2`` counts twice) and are
fed by ``observe`` for every delta the shim reads. Scheduler gauges are read from the
``stats`` control call when ``/metrics`` is scraped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..protocol import RequestDelta

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            10.0, 20.0, 40.0, 80.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
              0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


@dataclass
class RequestClock:
    """Timestamps of one SDK request, for its latency histograms."""

    start: float
    last_token: float | None = None  # when the previous delta with tokens arrived


class Metrics:
    """The shim's counters, histograms and gauges."""

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.model = model_name
        self.success = Counter("xllm:request_success", "Requests finished, by finish reason",
                               labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("xllm:prompt_tokens", "Prompt tokens of requests run",
                                     labels, registry=r)
        self.generation_tokens = Counter("xllm:generation_tokens", "Tokens generated",
                                         labels, registry=r)
        self.ttft = Histogram("xllm:time_to_first_token_seconds", "Time to the first token",
                              labels, buckets=_LATENCY, registry=r)
        self.itl = Histogram("xllm:inter_token_latency_seconds",
                             "Time between two outputs of a request, per token", labels,
                             buckets=_TOKEN_GAP, registry=r)
        self.e2e = Histogram("xllm:e2e_request_latency_seconds", "Request latency, first byte "
                             "in to finish", labels, buckets=_E2E, registry=r)
        self.queue = Histogram("xllm:request_queue_time_seconds", "Time from arrival to the "
                               "first step that ran the request", labels, buckets=_E2E, registry=r)
        self.http = Counter("xllm:http_requests", "HTTP requests answered, by path and status",
                            ["path", "status"], registry=r)
        self.running = Gauge("xllm:num_requests_running", "Requests in the running batch",
                             labels, registry=r)
        self.waiting = Gauge("xllm:num_requests_waiting", "Requests waiting to be scheduled",
                             labels, registry=r)
        self.kv_usage = Gauge("xllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0..1)",
                              labels, registry=r)
        self.instances = Gauge("xllm:num_instances", "Instances the router places requests on",
                               labels, registry=r)
        self.instances_lost = Gauge("xllm:instances_lost", "Instances the router lost since it "
                                    "started", labels, registry=r)
        # adaptive PD (the router's role changes)
        self.role_changes = Gauge("xllm:role_changes", "Instances the router turned from prefill to decode "
                                  "or back since it started", labels, registry=r)
        self.instance_role = Gauge("xllm:instance_role", "1 for each instance's role now (mixed, prefill, "
                                   "decode), 0 for the others", [*labels, "instance", "role"], registry=r)
        # prefill/decode disaggregation, as the decode instances count it (failures: both sides)
        self.kv = {key: Gauge(f"xllm:{key}", text, labels, registry=r) for key, text in (
            ("kv_transfers", "PD KV transfers completed"),
            ("kv_transfer_bytes", "Bytes of KV received from prefill instances"),
            ("kv_transfer_seconds", "Seconds PD transfers took, summed"),
            ("kv_transfer_failures", "PD transfers that failed or were cancelled"),
            ("kv_transfers_in_flight", "PD transfers under way"),
            ("kv_recomputed", "Decode requests that computed their prompt after a failed transfer"))}

        # speculative decoding, summed over instances (vLLM's names)
        self.spec = {key: Gauge(f"xllm:spec_decode_{name}", text, labels, registry=r) for key, name, text in (
            ("spec_num_drafts", "num_drafts", "Requests' steps that verified draft tokens"),
            ("spec_draft_tokens", "num_draft_tokens", "Draft tokens proposed"),
            ("spec_accepted_tokens", "num_accepted_tokens", "Draft tokens accepted"))}
        self.spec_per_pos = Gauge("xllm:spec_decode_num_accepted_tokens_per_pos",
                                  "Draft tokens accepted at each position of the drafts",
                                  [*labels, "position"], registry=r)

    def start(self) -> RequestClock:
        """A clock for one SDK request submitted now."""
        return RequestClock(time.perf_counter())

    def observe(self, clock: RequestClock, delta: RequestDelta, first: bool) -> None:
        """Account for one delta of a request (``first``: its first delta)."""
        now = time.perf_counter()
        m = self.model
        if first:
            self.prompt_tokens.labels(m).inc(delta.num_prompt_tokens)
            self.queue.labels(m).observe(delta.queue_time)
        n = len(delta.token_ids)
        if n:
            self.generation_tokens.labels(m).inc(n)
            if clock.last_token is None:
                self.ttft.labels(m).observe(now - clock.start)
            else:
                gap = (now - clock.last_token) / n
                for _ in range(n):
                    self.itl.labels(m).observe(gap)
            clock.last_token = now
        if delta.finish_reason is not None:
            self.e2e.labels(m).observe(now - clock.start)
            self.success.labels(m, delta.finish_reason).inc()

    def set_stats(self, stats: dict) -> None:
        """Scheduler gauges from a ``stats`` control call's result."""
        m = self.model
        self.running.labels(m).set(stats.get("num_running", 0))
        self.waiting.labels(m).set(stats.get("num_waiting", 0))
        self.kv_usage.labels(m).set(stats.get("kv_usage", 0.0))
        router = stats.get("router", {})
        self.instances.labels(m).set(router.get("num_instances", 0))
        self.instances_lost.labels(m).set(router.get("instances_lost", 0))
        self.role_changes.labels(m).set(router.get("role_changes", 0))
        for instance, role in router.get("roles", {}).items():
            for each in ("mixed", "prefill", "decode"):
                self.instance_role.labels(m, instance, each).set(1 if each == role else 0)
        per = stats.get("instances", {}).values()
        decode = [i for i in per if i.get("role") == "decode"]
        for key, gauge in self.kv.items():
            both = key in ("kv_transfer_failures", "kv_transfers_in_flight")
            gauge.labels(m).set(sum(i.get(key, 0) for i in (per if both else decode)))
        for key, gauge in self.spec.items():
            gauge.labels(m).set(stats.get(key, 0))
        for pos, n in enumerate(stats.get("spec_accepted_per_position", [])):
            self.spec_per_pos.labels(m, str(pos)).set(n)

    def count_http(self, path: str, status: int) -> None:
        """One HTTP response sent."""
        self.http.labels(path, str(status)).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)
