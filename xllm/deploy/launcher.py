"""``xllm-launch``: start a deployment, serve until told to stop, stop it cleanly.

The command line is parsed here (its flags are in ``flags``); everything derived from the
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

from ..config import (AdaptivePDConfig, CacheConfig, EngineConfig, HttpConfig, ModelConfig, ParallelConfig,
                      RouterConfig, SchedulerConfig, SloConfig, SpeculativeConfig, read_hf_config)
from ..models.spec import DecoderSpec
from ..kv_transfer import pool as kv_pool
from ..metastore import etcd_access
from ..platform import current, serving_dtype
from .flags import build_parser
from .plan import DeploymentPlan, host_plan

log = logging.getLogger("xllm.deploy")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


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
        if args.role == "instance" and args.drain_on_stop > 0:
            log.info("draining before the stop (at most %.0f s): the routers move running requests elsewhere",
                     args.drain_on_stop)
            hurry = asyncio.Event()  # a second signal: stop now
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, hurry.set)
            left = await sup.drain(args.drain_on_stop, hurry)
            if left:
                log.warning("stopping with requests still on %s", ", ".join(left))
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
