"""The disk tier's bytes: one file per KV block under the instance's directory, kept
across restarts and checked whenever it is read.

A block's file (``{hash:016x}.kvb``)::

    header   magic "XLLMKVB1", block hash, parent hash, number of tokens, ranks, layers,
             block bytes (little-endian), then a 16-byte BLAKE2b digest
    tokens   int64 token ids of the block
    data     (ranks, layers, 2, block_bytes) bytes: the block's K and V, every rank and layer

The digest covers the header (without itself), the token ids and the data. A read checks
the digest, that the header names the hash asked for, and that the hash is the chained
hash of the parent and the token ids (``xllm.block_hash``): a file that fails any check
is a miss (the block is recomputed), is deleted, and is never served.

The directory also holds ``layout.json`` (model, dtype, block size, ranks, layers, block
bytes): blocks of another model or layout are not this instance's, and are removed at start.
Files are written under a temporary name and renamed, so a crash leaves no half file that
could pass for a block (and a torn write fails its digest anyway).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from ..block_hash import hash_block

log = logging.getLogger(__name__)

MAGIC = b"XLLMKVB1"
SUFFIX = ".kvb"
_FIELDS = struct.Struct("<8sQQIIIQ")  # magic, hash, parent, tokens, ranks, layers, block bytes
_DIGEST = 16
HEADER_BYTES = _FIELDS.size + _DIGEST


class DiskTier:
    """Block files under ``root``. Verbs: write, read, delete, scan."""

    def __init__(self, root: Path, layout: dict) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.shape = (layout["ranks"], layout["layers"], 2, layout["block_bytes"])
        self.block_tokens = layout["block_size"]
        manifest = self.root / "layout.json"
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError):
            found = None
        if found != layout:
            if found is not None:
                log.warning("disk tier %s held blocks of another model or layout (%s); removing them",
                            self.root, found)
            for path in self.root.glob(f"*{SUFFIX}"):
                path.unlink(missing_ok=True)
            manifest.write_text(json.dumps(layout, sort_keys=True))

    def path(self, block_hash: int) -> Path:
        return self.root / f"{block_hash:016x}{SUFFIX}"

    # -- verbs ---------------------------------------------------------------------------
    def write(self, block_hash: int, parent: int, tokens, data: np.ndarray) -> None:
        """Write one block's file (``data``: ``(ranks, layers, 2, block_bytes)`` uint8)."""
        toks = np.asarray(tokens, dtype="<i8").tobytes()
        fields = _FIELDS.pack(MAGIC, block_hash, parent, len(tokens), *self.shape[:2], self.shape[3])
        raw = memoryview(np.ascontiguousarray(data)).cast("B")
        digest = hashlib.blake2b(fields, digest_size=_DIGEST)
        digest.update(toks)
        digest.update(raw)
        path = self.path(block_hash)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(fields + digest.digest() + toks)
            f.write(raw)
        os.replace(tmp, path)

    def read(self, block_hash: int, out: np.ndarray) -> tuple[str, int, tuple[int, ...]]:
        """Read and check one block into ``out``; returns ``("", parent, tokens)``, or the
        problem (the file is then deleted and ``out`` must not be used)."""
        path = self.path(block_hash)
        try:
            buf = path.read_bytes()
        except OSError as exc:
            return f"cannot read {path.name}: {exc.strerror or exc}", 0, ()
        problem, parent, tokens = self._check(buf, block_hash)
        if problem:
            log.error("disk tier: %s fails its check (%s); it is recomputed, not served", path.name, problem)
            path.unlink(missing_ok=True)
            return problem, 0, ()
        start = HEADER_BYTES + 8 * len(tokens)
        out[...] = np.frombuffer(buf, dtype=np.uint8, offset=start).reshape(self.shape)
        os.utime(path)  # its age orders the blocks a restarted instance finds
        return "", parent, tokens

    def delete(self, block_hash: int) -> None:
        self.path(block_hash).unlink(missing_ok=True)

    def scan(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """The blocks on disk as (hash, parent, tokens), least recently used first. Only
        headers are read (the data is checked when fetched); unreadable files go."""
        found = []
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write a crash interrupted
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                with open(path, "rb") as f:
                    head = f.read(HEADER_BYTES)
                    magic, h, parent, n, *_ = _FIELDS.unpack(head[:_FIELDS.size])
                    tokens = tuple(np.frombuffer(f.read(8 * n), dtype="<i8").tolist()) if n < 4096 else ()
                age = path.stat().st_mtime
            except (OSError, struct.error, ValueError):
                path.unlink(missing_ok=True)
                continue
            if magic != MAGIC or path.name != self.path(h).name or len(tokens) != self.block_tokens \
                    or hash_block(parent, tokens) != h:
                log.warning("disk tier: removing %s (not a block file of this layout)", path.name)
                path.unlink(missing_ok=True)
                continue
            found.append((age, h, parent, tokens))
        found.sort()
        return [(h, parent, tokens) for _, h, parent, tokens in found]

    # -- checks --------------------------------------------------------------------------
    def _check(self, buf: bytes, block_hash: int) -> tuple[str, int, tuple[int, ...]]:
        if len(buf) < HEADER_BYTES:
            return "a truncated header", 0, ()
        magic, h, parent, n, ranks, layers, block_bytes = _FIELDS.unpack_from(buf)
        if magic != MAGIC:
            return "not a block file", 0, ()
        if h != block_hash:
            return f"it holds block {h:016x}", 0, ()
        if (ranks, layers, block_bytes) != (self.shape[0], self.shape[1], self.shape[3]) or n != self.block_tokens:
            return "another layout", 0, ()
        data_bytes = int(np.prod(self.shape))
        if len(buf) != HEADER_BYTES + 8 * n + data_bytes:
            return f"{len(buf)} bytes, not {HEADER_BYTES + 8 * n + data_bytes}", 0, ()
        view = memoryview(buf)
        digest = hashlib.blake2b(view[:_FIELDS.size], digest_size=_DIGEST)
        digest.update(view[HEADER_BYTES:])
        if digest.digest() != bytes(view[_FIELDS.size:HEADER_BYTES]):
            return "its checksum does not match its contents", 0, ()
        tokens = tuple(np.frombuffer(buf, dtype="<i8", count=n, offset=HEADER_BYTES).tolist())
        # NOTE: trust, but verify a hash: the tokens must be the ones the hash was made of
        if hash_block(parent, tokens) != block_hash:
            return "its token ids do not make its hash", 0, ()
        return "", parent, tokens
