"""Configuration: small frozen dataclasses, one per concern, validated when built.

Each actor takes only the pieces it needs. The launcher is the one place that parses
the command line (``xllm.deploy.launcher``) and resolves derived values (dtype, context length,
KV block count) before any actor starts, so every actor sees the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import msgspec

POLICIES = ("fcfs", "priority", "prefill_first", "decode_first")
QUANTIZATIONS = ("none", "q8_0")  # weight formats of the linears (xllm.layers.quantization)


@dataclass(frozen=True)
class ModelConfig:
    """Which checkpoint to serve and how."""

    path: str  # a Hugging Face model directory
    dtype: str = "float32"  # "float32" or "bfloat16" (resolved from "auto" by the launcher)
    max_model_len: int = 2048  # prompt + output tokens per request
    served_name: str = ""  # the name clients use; the directory's name by default
    seed: int = 0  # seeds the sampler of requests that bring no seed
    enforce_eager: bool = False  # no compiled decode graphs: every step runs eagerly
    quantization: str = "none"  # linear weights: "none" (dtype) or "q8_0" (xllm.layers.quantization)
    profile: bool = True  # measure the instance's service times at start (xllm.worker.profiler)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16  # tokens per KV block
    num_blocks: int = 1024  # blocks in the pool (resolved by the launcher)
    enable_prefix_caching: bool = True
    # KV tiers below the device pool (README "KV cache tiers"); both off unless asked for
    host_blocks: int = 0  # blocks the KV agent keeps in its own memory (--kv-host-memory); 0: no host tier
    disk_dir: str = ""  # where the KV agent keeps blocks across restarts (--kv-disk-dir); "": no disk tier
    disk_blocks: int = 0  # blocks the disk tier holds at most (--kv-disk-size)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2, got {self.num_blocks}")
        if self.host_blocks < 0 or self.disk_blocks < 0:
            raise ValueError("host_blocks and disk_blocks must be >= 0")
        if self.tiers and not self.enable_prefix_caching:
            raise ValueError("KV tiers keep prefix-cache blocks: they need prefix caching on")
        if bool(self.disk_dir) != (self.disk_blocks > 0):
            raise ValueError("the disk tier needs both a directory (--kv-disk-dir) and a size (--kv-disk-size)")
        if self.disk_dir and not self.host_blocks:
            # NOTE: blocks come back from disk through host memory, where they are verified
            # before anything may read them (a disk hit is never served unchecked)
            raise ValueError("the disk tier needs a host tier (--kv-host-memory): blocks come back through it")

    @property
    def tiers(self) -> bool:
        """Whether blocks evicted from the device pool go down to host memory (and disk)."""
        return self.host_blocks > 0


@dataclass(frozen=True)
class SchedulerConfig:
    """How the scheduler fills each step."""

    max_num_seqs: int = 64  # requests per step at most
    max_num_batched_tokens: int = 2048  # tokens per step at most (the chunked-prefill budget)
    policy: str = "fcfs"
    async_scheduling: bool = True  # plan step N+1 while the workers run step N
    stream_interval: int = 1  # decode tokens sent as one message (first and last token at once)
    continuous_decode_steps: int = 1  # decode steps a worker runs from one plan when nothing waits
    max_queued_requests: int = 10_000  # more waiting requests than this are refused
    worker_stall_timeout_s: float = 10.0  # a step or a silent worker past this: health fails
    kv_transfer_timeout_s: float = 30.0  # PD: a transfer not done by then is cancelled (decode recomputes)
    kv_layerwise: bool = True  # PD: push each layer's KV as it is stored (False: once the step is done)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.worker_stall_timeout_s <= 0:
            raise ValueError("worker_stall_timeout_s must be positive")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be at least 1")
        if self.continuous_decode_steps < 1:
            raise ValueError("continuous_decode_steps must be at least 1")


@dataclass(frozen=True)
class ParallelConfig:
    """How an instance's worker ranks cooperate (their number is the instance's ``tp_size``)."""

    micro_batch_overlap: bool = False  # two micro-batches: all-reduce of one beside compute of the other
    shm_collectives: bool = True  # CPU ranks of one host: all-reduce/all-gather through shared memory


ROUTER_POLICIES = ("round_robin", "prefix_cache_aware", "kv_cache_aware", "slo_aware")


@dataclass(frozen=True)
class SloConfig:
    """Latency targets the router places requests for (``slo_aware``) and sizes the prefill
    and decode pools by (``--adaptive-pd``); 0 means no target."""

    ttft_s: float = 0.0  # time to the first token
    tpot_s: float = 0.0  # time per output token after the first
    reject: bool = False  # slo_aware: refuse (429) a request no instance is predicted to serve within both

    def __post_init__(self) -> None:
        if self.ttft_s < 0 or self.tpot_s < 0:
            raise ValueError("SLO targets must be >= 0 (0: none)")

    @property
    def set(self) -> bool:
        return self.ttft_s > 0 and self.tpot_s > 0


@dataclass(frozen=True)
class AdaptivePDConfig:
    """The router's adaptive PD controller (``xllm.router.adaptive``): it turns prefill
    instances into decode instances and back while they serve."""

    enabled: bool = False
    interval_s: float = 1.0  # how often it looks at the split
    window_s: float = 10.0  # the demand it sizes for: arrivals decayed with this time constant
    hold_s: float = 3.0  # a better split must stay better this long before an instance changes role
    cooldown_s: float = 10.0  # after a change, no other for this long
    margin: float = 0.2  # the better split's pressure must be this much lower (a share of the current one)
    drain_timeout_s: float = 30.0  # an instance switches then, whatever of its old role is left

    def __post_init__(self) -> None:
        if min(self.interval_s, self.window_s) <= 0 or min(self.hold_s, self.cooldown_s, self.drain_timeout_s) < 0:
            raise ValueError("adaptive PD periods must be positive (hold, cooldown and drain timeout >= 0)")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"the adaptive PD margin must be in [0, 1), got {self.margin}")


# A host or disk hit's cost against recomputing the block, per token (README "KV cache
# tiers": load-back seconds per token over prefill seconds per token, bench.tier_cost)
TIER_WEIGHTS = (0.02, 0.1)


@dataclass(frozen=True)
class RouterConfig:
    """The global scheduler (``xllm.router``): how it places requests on instances."""

    policy: str = "prefix_cache_aware"
    pd_short_prompt: int = 0  # with PD: prompts this short skip the prefill side (a mixed or the decode instance)
    slo: SloConfig = field(default_factory=SloConfig)
    adaptive: AdaptivePDConfig = field(default_factory=AdaptivePDConfig)
    tier_weights: tuple[float, float] = TIER_WEIGHTS  # prefix_cache_aware: a host, a disk hit against recomputing

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(ROUTER_POLICIES)}; got {self.policy!r}")
        if self.policy == "slo_aware" and not self.slo.set:
            raise ValueError("--router-policy slo_aware needs both --slo-ttft-ms and --slo-tpot-ms")
        if self.adaptive.enabled and not self.slo.set:
            raise ValueError("--adaptive-pd needs both --slo-ttft-ms and --slo-tpot-ms (it sizes the pools by them)")
        if len(self.tier_weights) != 2 or not all(0.0 <= w <= 1.0 for w in self.tier_weights):
            raise ValueError(f"tier weights are two numbers in [0, 1] (host, disk); got {self.tier_weights}")

    @property
    def weights(self) -> tuple[float, float, float]:
        """Each tier's weight, device first (a device hit costs nothing)."""
        return (0.0, *self.tier_weights)


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP shim (``xllm.http``); ``port`` 0 means no shim."""

    host: str = "127.0.0.1"
    port: int = 0  # TCP port of the HTTP server; 0: the deployment has no HTTP shim
    max_body_bytes: int = 4 * 2**20  # larger request bodies are answered 413
    request_timeout_s: float = 600.0  # a request still running after this is aborted (408)
    max_concurrent_requests: int = 0  # HTTP requests in flight at most (more get 429); 0: no cap
    api_key: str = ""  # every route but /health needs "Authorization: Bearer <key>"; "": no key
    tool_call_parser: str = ""  # how tool calls are read out of replies (xllm.chat.tool_parsers); "": off
    reasoning_parser: str = ""  # how <think> parts become reasoning_content (xllm.chat.reasoning); "": off

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"the HTTP port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        if self.max_concurrent_requests < 0:
            raise ValueError("max_concurrent_requests must be >= 0 (0: no cap)")
        from .chat import reasoning, tool_parsers

        if self.tool_call_parser:
            tool_parsers.tool_parser(self.tool_call_parser)  # ValueError naming the known ones
        if self.reasoning_parser:
            reasoning.reasoning_parser(self.reasoning_parser)


SPECULATIVE_METHODS = ("suffix", "ngram", "draft", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (``xllm.spec``); ``method`` "" means off."""

    method: str = ""  # "suffix" (suffix match), "ngram" (prompt lookup), "draft" (a model), "mtp"
    num_tokens: int = 4  # draft tokens a request may verify per step
    max_batch: int = 8  # a step with more decoding requests than this does not speculate
    draft_model: str = ""  # "draft": the draft model's directory (resolved by the launcher)

    def __post_init__(self) -> None:
        if self.method and self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}; "
                             f"got {self.method!r}")
        if self.num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_tokens}")
        if self.max_batch < 1:
            raise ValueError(f"speculative max batch must be at least 1, got {self.max_batch}")
        if (self.method == "draft") != bool(self.draft_model):
            raise ValueError("--speculative draft needs --draft-model (and --draft-model needs --speculative draft)")


@dataclass(frozen=True)
class EngineConfig:
    """The engine settings every instance of a deployment shares; each actor takes the
    parts it needs. Where the actors are and how many is the deployment plan's business
    (``xllm.deploy.plan``)."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EngineConfig":
        return msgspec.json.decode(text, type=cls)


def read_hf_config(model: str | os.PathLike) -> dict:
    """The checkpoint's config as a ``config.json``-shaped dict (a directory or a GGUF file)."""
    from .models.loader import read_config

    return read_config(model)
