"""Incremental detokenization with stop strings.

Token ids arrive a step at a time; ``tokenizers``' ``DecodeStream`` turns them into text
as soon as complete characters exist (multi-byte characters split across tokens come
out whole). Text that could still grow into a stop string is held back until it
cannot, so a client never sees part of a stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Streams one request's output text; ``feed`` returns (text to emit, stopped)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop = stop
        self.include_stop = include_stop
        self.max_hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""  # decoded text not yet emitted (a possible stop-string start)
        self.text = ""  # everything emitted so far

    def feed(self, token_ids: list[int]) -> tuple[str, bool]:
        for tok in token_ids:
            piece = self.stream.step(self.tokenizer, tok)
            if piece:
                self.pending += piece
        if not self.stop:
            return self._emit(len(self.pending)), False
        hit = self._find_stop()
        if hit is not None:
            start, end = hit
            out = self._emit(end if self.include_stop else start)
            self.pending = ""
            return out, True
        return self._emit(len(self.pending) - self._held_back()), False

    def flush(self) -> str:
        """Everything still held back (the request ended without a stop string)."""
        return self._emit(len(self.pending))

    def _emit(self, n: int) -> str:
        out, self.pending = self.pending[:n], self.pending[n:]
        self.text += out
        return out

    def _find_stop(self) -> tuple[int, int] | None:
        best = None
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, i + len(s))
        return best

    def _held_back(self) -> int:
        """Length of the longest tail of ``pending`` that starts some stop string."""
        tail = self.pending[-self.max_hold:] if self.max_hold else ""
        for k in range(len(tail), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stop):
                return k
        return 0
