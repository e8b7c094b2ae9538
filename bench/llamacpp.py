"""llama.cpp as a peer: its ``llama-server`` built from source, a checkpoint as GGUF, a server.

- ``ensure_server()``: ``llama-server`` built once from the llama.cpp sources vendored in
  the ``llama-cpp-python`` sdist (fetched with pip, the version pinned below), with native
  CPU flags (``GGML_NATIVE``: AVX-512 and its BF16 dot products where the CPU has them),
  Release, no curl. Kept in ``~/.cache/xllm/llama.cpp/<version>`` (``$XLLM_LLAMACPP_DIR``)
  with the converter (``convert_hf_to_gguf.py`` and its ``gguf-py``).
- ``to_gguf(model_dir, outtype)``: the checkpoint as GGUF, by llama.cpp's own converter;
  for the tokenizers the model maker trains (which the converter does not know by hash)
  by ``xllm_tools.gguf_export``, the same tensor layout and a ``default`` pre-tokenizer.
  The benchmarks send token ids, so the tokenizer only has to load.
- ``LlamaServer(gguf, slots)``: the server on a free port with 2 threads, continuous
  batching, ``slots`` parallel sequences sharing ``ctx_per_slot * slots`` of context;
  stopped (and waited for) on exit.

Its ``/v1/completions`` takes token-id prompts, ``max_tokens``, ``temperature``,
``ignore_eos`` and ``stream`` like xllm's, so one HTTP client drives both.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp's sources


def cache_dir() -> Path:
    root = os.environ.get("XLLM_LLAMACPP_DIR") or Path.home() / ".cache" / "xllm" / "llama.cpp"
    return Path(root) / VERSION


def ensure_server(log=print) -> Path:
    """The ``llama-server`` binary, built on first use (about 10 minutes on 2 cores)."""
    root = cache_dir()
    binary = root / "bin" / "llama-server"
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llamacpp-") as tmp:
        tmp = Path(tmp)
        log(f"llama.cpp: fetching the llama-cpp-python {VERSION} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(tmp)], check=True)
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(tmp.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = tmp / "build"
        log("llama.cpp: building llama-server (native CPU flags, Release)")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
        (root / "bin").mkdir(exist_ok=True)
        shutil.copy2(next(build.rglob("llama-server")), binary)
        shutil.rmtree(root / "convert", ignore_errors=True)
        (root / "convert").mkdir()
        shutil.copy2(src / "convert_hf_to_gguf.py", root / "convert")
        shutil.copytree(src / "gguf-py", root / "convert" / "gguf-py")
        if (src / "conversion").is_dir():
            shutil.copytree(src / "conversion", root / "convert" / "conversion")
    return binary


def to_gguf(model_dir: Path, outtype: str = "bf16", log=print) -> Path:
    """``model_dir`` as a GGUF file of ``outtype`` (``bf16``, ``f32``, ``q8_0``), cached beside it."""
    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.suffix == ".gguf":
        return model_dir
    ggufs = sorted(model_dir.glob("*.gguf"))
    if ggufs:
        return ggufs[0]
    out = cache_dir() / "models" / f"{model_dir.name}.{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_server(log)
    convert = cache_dir() / "convert"
    env = {**os.environ, "PYTHONPATH": str(convert / "gguf-py")}
    done = subprocess.run([sys.executable, str(convert / "convert_hf_to_gguf.py"), str(model_dir),
                           "--outtype", outtype, "--outfile", str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode == 0:
        log(f"llama.cpp: converted {model_dir.name} with convert_hf_to_gguf.py ({outtype})")
        return out
    out.unlink(missing_ok=True)
    from xllm_tools.gguf_export import export_gguf

    log(f"llama.cpp: its converter refused {model_dir.name} ({done.stderr.strip().splitlines()[-1][:160]}); "
        f"writing it with xllm_tools.gguf_export ({outtype})")
    return export_gguf(model_dir, out, outtype.upper())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A running ``llama-server`` for one GGUF file; ``url`` is its ``/v1/completions``."""

    def __init__(self, gguf: Path, slots: int = 1, threads: int = 2, ctx_per_slot: int = 1024,
                 startup_timeout: float = 300.0) -> None:
        self.gguf, self.slots, self.threads = Path(gguf), slots, threads
        self.ctx = ctx_per_slot * slots
        self.timeout = startup_timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/completions"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LlamaServer":
        binary = ensure_server()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
             "-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.slots), "-c", str(self.ctx),
             "-b", "2048", "-ub", "512", "--no-webui"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace")[-2000:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"llama-server did not start:\n{tail}")
            time.sleep(0.25)
        return self

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status == 200 and json.loads(resp.read() or b"{}").get("status") == "ok"
        except (OSError, ValueError):
            return False
        finally:
            conn.close()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
