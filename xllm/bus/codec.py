"""msgspec codec for multipart ZeroMQ messages with zero-copy array frames.

Frame 0 is the msgpack-encoded struct. Every ``numpy.ndarray`` inside it is replaced by
``[dtype, shape, frame_index]`` and its bytes travel as frame ``frame_index``; on the
way in the array is rebuilt over the received buffer without copying.
"""

from __future__ import annotations

from typing import Any, Sequence

import msgspec
import numpy as np


class DecodeError(ValueError):
    """A message did not match the socket's schema (or its frames are inconsistent)."""


class EncodeError(ValueError):
    """A message could not be encoded (e.g. an integer beyond 64 bits)."""


class Encoder:
    """Encodes one struct into a list of frames: ``[payload, *array_buffers]``."""

    def __init__(self) -> None:
        self._frames: list[Any] = []
        self._enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            arr = np.ascontiguousarray(obj)
            self._frames.append(memoryview(arr).cast("B") if arr.size else b"")
            return [arr.dtype.str, list(arr.shape), len(self._frames) - 1]
        raise NotImplementedError(f"cannot send a {type(obj).__name__} on the wire")

    def encode(self, msg: msgspec.Struct) -> list[Any]:
        self._frames = [b""]
        try:
            self._frames[0] = self._enc.encode(msg)
        except (OverflowError, TypeError, NotImplementedError, msgspec.EncodeError) as exc:
            raise EncodeError(f"cannot send {type(msg).__name__}: {exc}") from exc
        finally:
            frames, self._frames = self._frames, []
        return frames


class Decoder:
    """Decodes frames into one of the structs of ``union``; raises ``DecodeError``."""

    def __init__(self, union: Any) -> None:
        self._frames: Sequence[Any] = ()
        self._dec = msgspec.msgpack.Decoder(union, dec_hook=self._dec_hook)

    def _dec_hook(self, typ: type, obj: Any) -> Any:
        if typ is np.ndarray:
            try:
                dtype, shape, index = obj
                buf = self._frames[index]
                arr = np.frombuffer(buf, dtype=np.dtype(dtype))
                return arr.reshape(shape)
            except (TypeError, ValueError, IndexError) as exc:
                raise DecodeError(f"bad array frame reference {obj!r}: {exc}") from exc
        raise NotImplementedError(f"no decoder for {typ}")

    def decode(self, frames: Sequence[Any]) -> Any:
        if not frames:
            raise DecodeError("empty message")
        self._frames = [f.buffer if hasattr(f, "buffer") else f for f in frames]
        try:
            return self._dec.decode(self._frames[0])
        except (msgspec.DecodeError, msgspec.ValidationError, DecodeError, NotImplementedError) as exc:
            raise DecodeError(str(exc)) from exc
        except RecursionError:
            # NOTE: a few KB of nested arrays exhaust the decoder's depth; that is a bad
            # message like any other, never a reason for the actor to die.
            raise DecodeError("the message nests too deeply") from None
        finally:
            self._frames = ()
