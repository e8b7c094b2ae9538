"""The KV pool of one worker rank in a named shared-memory file, so the instance's KV
agent reads and writes blocks in place, without a copy through the worker.

File layout (little-endian, one file per instance rank under ``/dev/shm``)::

    header  4096 bytes: int64 [MAGIC, num_layers, num_blocks, block_bytes, step_id, layers_done,
                               load_step, load_layers, ...]
    layer 0 K pool  num_blocks * block_bytes
    layer 0 V pool  num_blocks * block_bytes
    layer 1 K pool  ...

A block of one layer's K (or V) pool is ``block_bytes`` contiguous bytes (the pools are
block-major; ``xllm_ops.paged_attention.kv_cache_shapes``), so moving block ``b`` of a
layer is moving one byte range, whatever the dtype. The worker views each pool as the
tensor its attention kernels expect; the agent views the same pages as a
``(num_blocks, block_bytes)`` uint8 array.

Progress: before a step the worker writes ``(step_id, 0)``; after each attention layer
has stored its K/V it writes ``layers_done``; after the step ``layers_done =
num_layers``. The agent sends a layer's blocks of a step once ``(step_id, layers_done)``
is past it. x86 keeps stores in order, so a published count means the K/V before it is
visible to the other process.

Loads (KV tiers), the other way: the agent writes blocks loaded back from host memory
while the step that reads them runs. It begins once the worker has started that step
(so no earlier step still touches the pool), writes ``(load_step, 0)``, and after each
layer of every loaded block ``load_layers``; the worker waits before each attention layer
until that layer is in (``loaded``), and at the end of the step until all are.

Files are named after the launcher's pid (``name``), so a launcher removes its own at the
end and the next one removes those of a launcher that died (``sweep``).

NOTE: CPU only. On a GPU the pool is device memory and the agent's role needs IPC
handles (untested, not written yet).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
PREFIX = "xllm-kv-"
HEADER_BYTES = 4096
MAGIC = 0x786C6C6D6B76  # "xllmkv"
_MAGIC, _LAYERS, _BLOCKS, _BLOCK_BYTES, _STEP, _DONE, _LOAD_STEP, _LOAD_DONE = range(8)


def pool_path(run_dir: str, instance: str, rank: int) -> Path:
    """The file of one rank's pool. The run directory's name starts with the launcher's
    pid (``xllm-run-PID-...``), and so does the file's, so stale ones can be swept."""
    run = Path(run_dir).name.removeprefix("xllm-run-")
    return SHM_DIR / f"{PREFIX}{run}-{instance}-r{rank}"


def sweep(launcher_pid: int | None = None) -> None:
    """Remove the pool files of ``launcher_pid`` (this launcher's, at its end), or, with
    None, those of every launcher that is no longer running."""
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if launcher_pid is not None and pid != launcher_pid:
            continue
        if launcher_pid is None and _alive(pid):
            continue
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedKVPool:
    """One rank's K and V pools of every layer, mapped from a shared file."""

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path = path
        self.buf = buf
        self.header = np.ndarray((HEADER_BYTES // 8,), dtype=np.int64, buffer=buf)
        if int(self.header[_MAGIC]) != MAGIC:
            raise ValueError(f"{path} is not an xllm KV pool")
        self.num_layers = int(self.header[_LAYERS])
        self.num_blocks = int(self.header[_BLOCKS])
        self.block_bytes = int(self.header[_BLOCK_BYTES])
        self.data = np.ndarray((self.num_layers, 2, self.num_blocks, self.block_bytes), dtype=np.uint8,
                               buffer=buf, offset=HEADER_BYTES)

    @classmethod
    def create(cls, path: Path, num_layers: int, num_blocks: int, block_bytes: int) -> "SharedKVPool":
        """A fresh, zeroed pool (over a stale file of the same name, if any)."""
        size = HEADER_BYTES + num_layers * 2 * num_blocks * block_bytes
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        header = np.ndarray((HEADER_BYTES // 8,), dtype=np.int64, buffer=buf)
        header[_LAYERS], header[_BLOCKS], header[_BLOCK_BYTES] = num_layers, num_blocks, block_bytes
        header[_STEP], header[_DONE] = -1, 0
        header[_LOAD_STEP], header[_LOAD_DONE] = -1, 0
        header[_MAGIC] = MAGIC  # last: a pool with its magic is complete
        return cls(path, buf)

    @classmethod
    def attach(cls, path: Path) -> "SharedKVPool":
        """Map a pool a worker created; ``FileNotFoundError`` or ``ValueError`` if it is
        not there (yet)."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise ValueError(f"{path} is not an xllm KV pool (yet)")
            buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, buf)

    # -- progress ----------------------------------------------------------------------
    def start_step(self, step_id: int) -> None:
        self.header[_DONE] = 0
        self.header[_STEP] = step_id

    def layer_done(self, layers_done: int) -> None:
        self.header[_DONE] = layers_done

    def progress(self) -> tuple[int, int]:
        """(step id, layers whose K/V that step has stored)."""
        step = int(self.header[_STEP])
        done = int(self.header[_DONE])
        if int(self.header[_STEP]) != step:  # a new step began between the two reads
            return step + 1, 0
        return step, done

    def written(self, step_id: int, layer: int) -> bool:
        """True once step ``step_id`` has stored layer ``layer`` (or a later step started)."""
        step, done = self.progress()
        return step > step_id or (step == step_id and done > layer)

    def started(self, step_id: int) -> bool:
        """True once the worker has started step ``step_id`` (every earlier step is done)."""
        return int(self.header[_STEP]) >= step_id

    # -- loads (KV tiers) --------------------------------------------------------------
    def start_load(self, step_id: int) -> None:
        self.header[_LOAD_DONE] = 0
        self.header[_LOAD_STEP] = step_id

    def load_done(self, layers_done: int) -> None:
        self.header[_LOAD_DONE] = layers_done

    def loaded(self, step_id: int, layer: int) -> bool:
        """True once the loads of step ``step_id`` have written layer ``layer`` (or the
        agent has moved on to a later step's)."""
        while True:
            step = int(self.header[_LOAD_STEP])
            done = int(self.header[_LOAD_DONE])
            if int(self.header[_LOAD_STEP]) == step:  # else a load began between the reads: again
                return step > step_id or (step == step_id and done > layer)

    # -- blocks ------------------------------------------------------------------------
    def read(self, layer: int, blocks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Copies of ``blocks`` of one layer's K and V pools, ``(n, block_bytes)`` each."""
        idx = np.asarray(blocks, dtype=np.int64)
        return self.data[layer, 0].take(idx, axis=0), self.data[layer, 1].take(idx, axis=0)

    def write(self, layer: int, blocks: list[int], k: np.ndarray, v: np.ndarray) -> None:
        idx = np.asarray(blocks, dtype=np.int64)
        self.data[layer, 0][idx] = k
        self.data[layer, 1][idx] = v

    def close(self) -> None:
        del self.header, self.data
        self.buf.close()
