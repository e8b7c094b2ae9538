"""The identity of a KV block: a chained hash of its tokens, the same in every process.

The frontend hashes each prompt's full blocks once; the scheduler's prefix cache, the
router's global prefix index and the KV events between them all use these values.

NOTE: a hash names a block's contents but is not proof of them: the scheduler checks a
cached block's token ids before it reuses it (``BlockManager.match_prefix``).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

ROOT_HASH = 0  # the parent of a sequence's first block


def hash_block(parent: int, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Chained 64-bit hash of one full block; stable across processes and machines."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(extra)
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, start: Sequence[int] = ()) -> list[int]:
    """The hashes of every full block of ``token_ids``, continuing the chain ``start``
    (hashes of its first blocks, already known)."""
    out = list(start)
    for i in range(len(out), len(token_ids) // block_size):
        out.append(hash_block(out[-1] if out else ROOT_HASH, token_ids[i * block_size:(i + 1) * block_size]))
    return out
